"""End to end on the tiny model: outputs, what trains and what does not, checkpoints, resume, W&B offline, LoRA."""

import csv
import json
import math

import lightning as L
import pytest
import torch

from enigma_lightning.commands.train import run

# On a random tiny model the format reward is constant; a length reward gives GRPO a signal.
SIGNAL = ["+reward.funcs.length._target_=helpers.length_reward", "+reward.funcs.length._partial_=true",
          "allowed_targets=[helpers]"]


def _metrics(out):
    with open(out / "metrics.csv") as f:
        return [r for r in csv.DictReader(f) if r.get("train/loss")]


def test_smoke_outputs(make_cfg, tmp_path, monkeypatch):
    from enigma_lightning.runtime import allocator

    modes = []
    monkeypatch.setattr(allocator, "configure", modes.append)
    out = tmp_path / "run"
    summary = run(make_cfg("experiment=smoke", "callbacks.samples.every_n_steps=2", out=out))
    assert modes == ["reuse"]  # CPU training applies cpu_malloc (tests/test_allocator.py checks what it does)
    for name in ("config.yaml", "metrics.csv", "summary.json", "samples.jsonl", "policy/config.json",
                 "checkpoints/last.ckpt"):
        assert (out / name).exists(), name
    assert summary["status"] == "finished" and summary["global_step"] == 4
    # one checkpoint per run by default (smoke checkpoints every 2 steps): the last
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last.ckpt"]
    assert torch.load(out / "checkpoints/last.ckpt", weights_only=False)["global_step"] == 4
    # samples every 2 steps from step 0, and the last step's
    steps = [json.loads(line)["step"] for line in (out / "samples.jsonl").read_text().splitlines()]
    assert sorted(set(steps)) == [0, 2, 3]
    rows = _metrics(out)
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3]
    required = ["train/loss", "train/reward/mean", "train/reward/std", "train/reward/format/mean",
                "train/reward/correctness/mean", "train/reward/frac_zero_std", "train/grpo/loss",
                "train/grpo/clip_ratio", "train/completions/mean_length", "train/completions/clipped_ratio",
                "perf/step_time", "perf/tokens_per_s"]
    assert all(rows[0][k] != "" for k in required)
    assert "val/format_rate" in summary["final"] and "val/accuracy_best" in summary["final"]


def test_policy_trains_reference_and_encoder_do_not(make_cfg, tmp_path):
    from enigma_lightning.commands.train import build_module

    cfg = make_cfg("experiment=smoke", "grpo.beta=0.04", *SIGNAL)
    module = build_module(cfg)
    assert module.reference is not None and module.encoder is not None
    policy0 = {k: v.clone() for k, v in module.policy.state_dict().items()}
    ref0 = {k: v.clone() for k, v in module.reference.state_dict().items()}
    enc0 = {k: v.clone() for k, v in module.encoder.state_dict().items()}
    opt_params = {id(p) for p in module.trainable_parameters()}
    assert opt_params == {id(p) for p in module.policy.parameters()}
    from hydra.utils import instantiate

    trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=instantiate(cfg.data))
    changed = [k for k, v in module.policy.state_dict().items() if not torch.equal(v, policy0[k])]
    assert len(changed) > len(policy0) // 2
    assert all(torch.equal(v, ref0[k]) for k, v in module.reference.state_dict().items())
    assert all(torch.equal(v, enc0[k]) for k, v in module.encoder.state_dict().items())
    assert trainer.callback_metrics["train/grpo/kl"] > 0


def test_checkpoint_holds_policy_only(make_cfg, tmp_path):
    out = tmp_path / "run"
    run(make_cfg("experiment=smoke", "grpo.beta=0.04", out=out))
    ckpt = torch.load(out / "checkpoints/last.ckpt", weights_only=False)
    keys = ckpt["state_dict"].keys()
    assert any(k.startswith("policy.") for k in keys)
    assert not any(k.startswith(("reference.", "encoder.")) for k in keys)
    assert ckpt["optimizer_states"] and "rng" in ckpt and ckpt["global_step"] == 4


class Crash(L.Callback):
    def __init__(self, at_step):
        self.at_step = at_step

    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == self.at_step:
            raise RuntimeError("simulated crash")


def test_resume_after_crash_matches_uninterrupted_run(make_cfg, tmp_path):
    common = ["experiment=smoke", "trainer.max_steps=4", "trainer.limit_val_batches=0", "grpo.beta=0.04", *SIGNAL]
    full = tmp_path / "full"
    run(make_cfg(*common, out=full))

    crashed = tmp_path / "crashed"
    cfg = make_cfg(*common, "+callbacks.crash._target_=test_train.Crash", "+callbacks.crash.at_step=3",
                   "allowed_targets=[helpers,test_train]", out=crashed)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(cfg)
    interrupted = crashed / "checkpoints/interrupted.ckpt"
    assert interrupted.exists()
    assert json.loads((crashed / "summary.json").read_text())["status"].startswith("failed: RuntimeError")

    resumed = tmp_path / "resumed"
    run(make_cfg(*common, f"ckpt_path={interrupted}", out=resumed))
    a = torch.load(full / "checkpoints/last.ckpt", weights_only=False)
    b = torch.load(resumed / "checkpoints/last.ckpt", weights_only=False)
    assert a["global_step"] == b["global_step"] == 4
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][k], v, rtol=1e-5, atol=1e-6)
    last_full, last_resumed = _metrics(full)[-1], _metrics(resumed)[-1]
    assert last_full["step"] == last_resumed["step"] == "3"
    assert float(last_full["train/loss"]) == pytest.approx(float(last_resumed["train/loss"]), abs=1e-5)

    # the same command again in the crashed run's folder (resume=auto): it resumes there, keeping the metrics of the
    # steps before the crash, and once finished a further run is skipped
    before = [r["step"] for r in _metrics(crashed)]
    assert before == ["0", "1", "2"]
    summary = run(make_cfg(*common, out=crashed))
    assert summary["status"] == "finished" and summary["global_step"] == 4
    assert [r["step"] for r in _metrics(crashed)] == ["0", "1", "2", "3"]
    c = torch.load(crashed / "checkpoints/last.ckpt", weights_only=False)
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(c["state_dict"][k], v, rtol=1e-5, atol=1e-6)
    mtime = (crashed / "summary.json").stat().st_mtime
    assert run(make_cfg(*common, out=crashed))["status"] == "finished"
    assert (crashed / "summary.json").stat().st_mtime == mtime


def test_num_iterations_reuses_rollout(make_cfg, tmp_path):
    out = tmp_path / "run"
    run(make_cfg("experiment=smoke", "step.num_iterations=2", "grpo.importance_sampling_level=token",
                 "grpo.epsilon=0.2", "grpo.epsilon_high=0.2", "optim.optimizer.lr=1e-2", *SIGNAL, out=out))
    rows = _metrics(out)
    # steps 0/1 share a rollout (same rewards), as do 2/3; step 1's ratio moved off 1, so clipping can occur
    assert rows[0]["train/reward/mean"] == rows[1]["train/reward/mean"]
    assert rows[2]["train/reward/mean"] == rows[3]["train/reward/mean"]
    assert float(rows[1]["train/grpo/loss"]) != float(rows[0]["train/grpo/loss"])


def test_wandb_offline_run(make_cfg, tmp_path):
    out = tmp_path / "run"
    run(make_cfg("experiment=smoke", "logger=wandb", "trainer.max_steps=2", out=out))
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))
    assert (out / "metrics.csv").exists()


def test_lora_trains_adapter_only(make_cfg, tmp_path):
    pytest.importorskip("peft")
    from hydra.utils import instantiate

    from enigma_lightning.commands.train import build_module

    cfg = make_cfg("experiment=smoke", "peft=lora", "peft.target_modules=[q_proj,v_proj]", "grpo.beta=0.04", *SIGNAL)
    module = build_module(cfg)
    assert module.reference is None and module.uses_adapter_reference
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=instantiate(cfg.data))
    assert trainer.callback_metrics["train/grpo/kl"] >= 0


def test_hub_path_with_local_folders_through_the_cli(tiny_dir, tmp_path):
    """`model=<id or folder> data=cot_collection data.path=<id or folder>`: a local folder stands in for hub ids."""
    import shutil

    from helpers import run_cli

    from enigma_lightning.data.datasets import bundled_path

    data = tmp_path / "cot_collection_like"
    data.mkdir()
    shutil.copy(bundled_path("eval"), data / "train.jsonl")
    out = tmp_path / "run"
    r = run_cli("enigma_lightning.train", "experiment=smoke", f"model={tiny_dir}", "data=cot_collection",
                f"data.path={data}", "data.val_size=8", "trainer.max_steps=2", f"hydra.run.dir={out}")
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = (out / "config.yaml").read_text()
    assert f"name_or_path: {tiny_dir}" in cfg and f"path: {data}" in cfg and "limit: 20000" in cfg
    assert json.loads((out / "summary.json").read_text())["global_step"] == 2


def test_bad_data_rows_stop_the_run_with_their_index(make_cfg, tmp_path):
    from enigma_lightning.errors import DataError

    bad = tmp_path / "bad.jsonl"
    rows = [{"source": f"q{i}", "target": str(i)} for i in range(30)]
    rows[4]["source"] = "  "
    del rows[17]["target"]
    bad.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(DataError, match=r"(?s)2 bad row\(s\).*row 4: empty 'source'.*row 17: missing field 'target'"):
        run(make_cfg("experiment=smoke", "data=local", f"data.path={bad}"))


def test_bf16_autocast_trains(make_cfg, tmp_path):
    out = tmp_path / "run"
    summary = run(make_cfg("experiment=smoke", "trainer.precision=bf16-mixed", "trainer.max_steps=2", *SIGNAL, out=out))
    assert summary["global_step"] == 2
    assert math.isfinite(summary["final"]["train/loss"])


def test_progress_bar_shows_seconds_per_step_for_slow_steps():
    from tqdm import tqdm

    from enigma_lightning.runtime.callbacks import ProgressBar

    slow = tqdm.format_meter(n=1, total=12, elapsed=50.0, bar_format=ProgressBar.BAR_FORMAT)
    fast = tqdm.format_meter(n=4, total=12, elapsed=2.0, bar_format=ProgressBar.BAR_FORMAT)
    assert "50.00s/it" in slow and "it/s" not in slow
    assert "2.00it/s" in fast
