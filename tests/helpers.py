"""Reward functions for tests: on a random tiny model the format reward is constant, so GRPO would see no signal."""


def length_reward(prompts, completions, **columns):
    """Longer completions score higher (gives non-zero advantages on a random model)."""
    return [len(c) / 100.0 for c in completions]


def digit_reward(prompts, completions, **columns):
    return [float(sum(ch.isdigit() for ch in c)) for c in completions]


def run_cli(module, *args, timeout=600, env=None):
    """Run ``python -m <module> <args>`` in a subprocess, as a user would (``env``: variables to add); returns the
    CompletedProcess."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    # the tests folder on the path, so configs can name test helpers (helpers.length_reward) as targets
    path = os.pathsep.join(p for p in (str(Path(__file__).parent), os.environ.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {}), "PYTHONPATH": path})


def _wandb_log_records(data: bytes):
    """Payloads of a .wandb file: a LevelDB-style log (7-byte file header, 32 KiB blocks, records with a 7-byte
    header: crc32, little-endian length, type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4)."""
    import struct

    block, pos, parts = 32768, 7, []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer: padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        parts.append(data[pos + 7 : pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):
            yield b"".join(parts)
            parts = []


def wandb_offline_run(run_dir):
    """(group, config) of an offline W&B run folder, read from its .wandb log with W&B's protobuf schema."""
    import json
    from pathlib import Path

    from wandb.proto import wandb_internal_pb2

    (path,) = Path(run_dir).glob("*.wandb")
    group, config = None, {}
    for data in _wandb_log_records(path.read_bytes()):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(data)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            group = rec.run.run_group
            config.update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in rec.config.update})
    return group, config


def configured(group_key: str, *overrides: str, **kwargs):
    """The object a config node builds (``ot``, ``sami``, ``grpo``, ``rollout``, ``step``, ...), with its defaults from
    the YAML (the one place they live), ``overrides`` on the command line's syntax and ``kwargs`` passed through."""
    from hydra import compose, initialize_config_module
    from hydra.utils import instantiate

    loss = {"ot": ["loss=[grpo,ot]"], "sami": ["loss=[grpo,sami]"]}.get(group_key, [])
    with initialize_config_module("enigma_lightning.conf", version_base="1.3"):
        cfg = compose("train", overrides=[*loss, *overrides, "paths.output_dir=/tmp/unused"])
    return instantiate(cfg[group_key], **kwargs)


def step_batch(mask, logps=None, **fields):
    """A StepBatch of B = mask rows (one question, G = B, K = 1) with zero ids and advantages."""
    import torch

    from enigma_lightning.losses.base import Layout, StepBatch

    b, t = mask.shape
    logps = torch.zeros(b, t) if logps is None else logps
    return StepBatch(torch.zeros(b, 1), torch.ones(b, 1), torch.zeros(b, t), mask, mask, torch.zeros(b), logps,
                     Layout(1, 1, b), **fields)


def nan_reward(prompts, completions, **columns):
    """A broken reward function: NaN for every completion."""
    return [float("nan")] * len(completions)



def sigterm_at(at_step: int = 1):
    """A callback that sends this process SIGTERM at the end of step ``at_step`` (a scheduler stopping the job)."""
    import os
    import signal

    import lightning as L

    class SigtermAt(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == at_step:
                os.kill(os.getpid(), signal.SIGTERM)

    return SigtermAt()


def sampling(**kwargs):
    """The rollout's SamplingConfig with the YAML's defaults and ``kwargs`` changed."""
    return configured("rollout", **kwargs)


def data_module(**kwargs):
    """The data module with the YAML's defaults (conf/data/bundled.yaml) and ``kwargs`` changed."""
    return configured("data", **kwargs)


def crash_saving_last(at_step: int = 2):
    """A callback that, from step ``at_step`` on, makes writing a sharded ``last.ckpt`` fail half-way: some files
    written, then an error (a full disk, a node lost while saving)."""
    import lightning as L

    class CrashSavingLast(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step != at_step:
                return
            import lightning.pytorch.strategies.model_parallel as mp

            save = mp._distributed_checkpoint_save

            def half_way(state, path):
                if "last" not in path.name:
                    return save(state, path)
                path.mkdir(parents=True, exist_ok=True)
                (path / "__0_0.distcp").write_bytes(b"half")
                raise OSError("simulated crash while saving last.ckpt")

            mp._distributed_checkpoint_save = half_way

    return CrashSavingLast()
