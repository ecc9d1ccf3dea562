"""FSDP2 (trainer=fsdp_cpu: two CPU processes, gloo) against the one-process run on the same global batch, in float64:
the same sampled completions, losses and gradient norms; the exported policy/ loads with from_pretrained and equals
the unsharded one; a run resumed from a sharded (DCP) checkpoint, or stopped by SIGTERM and started again, equals
the uninterrupted one; a crash while saving a sharded checkpoint leaves the previous one whole; loss=full (OT's cloud
gathered over ranks) under DDP and FSDP; LoRA under FSDP (slow)."""

import csv
import json

import pytest
import torch
from helpers import run_cli
from test_distributed import OPTIM, SIGNAL

COMMON = ["experiment=smoke", "trainer.max_steps=2", "rollout.seed_per_prompt=true", "grpo.loss_type=dapo",
          "trainer.limit_val_batches=1", "trainer.val_check_interval=2", "model.dtype=float64",
          "callbacks.checkpoint.every_n_train_steps=1", "callbacks.checkpoint.save_top_k=-1", *OPTIM, *SIGNAL]
KEYS = ("train/loss", "train/grad_norm", "train/grpo/loss", "train/reward/mean", "train/completions/mean_length")


def _rows(out):
    with open(out / "metrics.csv") as f:
        return [r for r in csv.DictReader(f) if r.get("train/loss")]


def _samples(out):
    return [(s["step"], s["prompt"], s["completion"]) for s in map(json.loads, open(out / "samples.jsonl"))]


def _train(out, *args):
    r = run_cli("enigma_lightning.train", *COMMON, *args, f"hydra.run.dir={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    return _rows(out)


def _same_rows(a, b, keys=KEYS, rel=1e-8):
    assert len(a) == len(b) == 2
    for ra, rb in zip(a, b, strict=True):
        for key in keys:
            tol = 1e-6 if key.startswith("train/reward") else rel  # rewards are float32 (means in another order)
            assert float(ra[key]) == pytest.approx(float(rb[key]), rel=tol, abs=1e-12), (key, ra[key], rb[key])


def _weights(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).state_dict()


def test_fsdp_two_processes_equal_one_process_export_and_resume(tmp_path, tiny_dir):
    from torch.distributed.checkpoint import FileSystemReader

    one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    a = _train(one, "data.batch_size=16")
    b = _train(two, "trainer=fsdp_cpu", "data.batch_size=8")
    _same_rows(a, b)
    assert abs(float(a[0]["train/loss"])) > 1e-3 and float(a[0]["train/grad_norm"]) > 1e-3  # real numbers
    # rank 0 keeps its first completions, which are the one-process run's first ones (whole prompts per rank)
    sa, sb = _samples(one), _samples(two)
    assert sb and all(s in sa for s in sb) and len({s[2] for s in sb}) > 1
    with open(two / "metrics.csv") as f:  # greedy validation ran under FSDP too (generation kept in step)
        assert any(r.get("val/accuracy") for r in csv.DictReader(f))
    # policy/: gathered from the shards, loadable, equal to the unsharded run's (SGD: float64 rounding only)
    wa, wb = _weights(one / "policy"), _weights(two / "policy")
    assert sorted(wa) == sorted(wb)
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-8
    base = _weights(tiny_dir)
    assert max((wa[k] - base[k].double()).abs().max().item() for k in wa) > 1e-4  # and both moved from the base
    # sharded checkpoints: one folder per checkpoint, the policy and optimiser state, never the frozen reference
    ckpt = two / "checkpoints" / "step000001.ckpt"
    keys = list(FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata)
    assert any(k.startswith("state_dict.policy.") for k in keys) and any(k.startswith("optimizer_0") for k in keys)
    assert not any(".reference." in k or ".encoder." in k for k in keys)
    # evaluation and probes read a sharded checkpoint too (gathered into one file): the same weights as policy/
    from hydra import compose, initialize_config_module

    from enigma_lightning.runtime.checkpoints import load_policy_from, merge_run_config

    with initialize_config_module("enigma_lightning.conf", version_base="1.3"):
        cfg = compose("evaluate", overrides=["paths.output_dir=unused", f"ckpt_path={two / 'checkpoints/last.ckpt'}"])
    from_ckpt = load_policy_from(merge_run_config(cfg))[0].state_dict()
    assert all(torch.equal(from_ckpt[k].double(), wb[k]) for k in wb)
    # resumed from step 1's sharded checkpoint: step 2 as in the uninterrupted run, bitwise, and the same policy/
    c = _train(resumed, "trainer=fsdp_cpu", "data.batch_size=8", f"ckpt_path={ckpt}")
    assert len(c) == 1 and all(c[0][k] == b[1][k] for k in KEYS), (c, b[1])
    wc = _weights(resumed / "policy")
    assert all(torch.equal(wc[k], wb[k]) for k in wb)
    # a scheduler's SIGTERM to both ranks after step 1: exit 143 with a sharded interrupted.ckpt; the same command
    # again resumes from it (resume=auto) and finishes as the uninterrupted run did
    stopped = tmp_path / "stopped"
    again = ["trainer=fsdp_cpu", "data.batch_size=8", "+callbacks.term._target_=helpers.sigterm_at",
             "+callbacks.term.at_step=1", "allowed_targets=[helpers]"]
    r = run_cli("enigma_lightning.train", *COMMON, *again, f"hydra.run.dir={stopped}")
    assert r.returncode == 143 and "stopped by SIGTERM" in r.stderr, r.stderr[-3000:]
    assert (stopped / "checkpoints" / "interrupted.ckpt").is_dir() and len(_rows(stopped)) == 1
    d = _train(stopped, *again)
    assert all(d[1][k] == b[1][k] for k in KEYS), (d, b)
    wd = _weights(stopped / "policy")
    assert all(torch.equal(wd[k], wb[k]) for k in wb)


def test_a_crash_while_saving_a_sharded_checkpoint_leaves_the_previous_one(tmp_path):
    """last.ckpt (a DCP folder, rewritten every step here) breaks half-way through its step-2 rewrite: the step-1
    last.ckpt stays whole, the crash's interrupted.ckpt is written, and the same command again resumes from it and
    finishes (step 3)."""
    out = tmp_path / "run"
    common = [a for a in COMMON if not a.startswith("trainer.max_steps=")]
    args = [*common, "trainer.max_steps=3", "trainer=fsdp_cpu", "data.batch_size=8", "callbacks.checkpoint.save_top_k=0",
            "+callbacks.crash._target_=helpers.crash_saving_last", "+callbacks.crash.at_step=2",
            "allowed_targets=[helpers]", f"hydra.run.dir={out}"]
    r = run_cli("enigma_lightning.train", *args)
    assert r.returncode != 0 and "simulated crash while saving last.ckpt" in r.stderr, r.stderr[-3000:]
    last = out / "checkpoints" / "last.ckpt"
    assert torch.load(last / "meta.pt", weights_only=False)["global_step"] == 1  # step 1's, whole
    assert (last / "__0_0.distcp").read_bytes() != b"half"
    assert torch.load(out / "checkpoints" / "interrupted.ckpt" / "meta.pt", weights_only=False)["global_step"] == 2
    from enigma_lightning.runtime.sweeps import resume_checkpoint

    assert resume_checkpoint(out).endswith("interrupted.ckpt")
    r = run_cli("enigma_lightning.train", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["global_step"] == 3
    assert torch.load(last / "meta.pt", weights_only=False)["global_step"] == 3
    assert not list((out / "checkpoints").glob(".*.partial")) and not list((out / "checkpoints").glob(".*.previous"))


@pytest.mark.slow
def test_fsdp_lora_equals_one_process(tmp_path):
    from safetensors.torch import load_file

    lora = ["peft=lora", "peft.lora_dropout=0.0", "peft.r=4", "grpo.beta=0.04"]  # beta: the adapter-off reference
    one, two = tmp_path / "one", tmp_path / "two"
    a = _train(one, *lora, "data.batch_size=16")
    b = _train(two, *lora, "trainer=fsdp_cpu", "data.batch_size=8")
    _same_rows(a, b)
    assert float(a[0]["train/grpo/kl"]) == pytest.approx(float(b[0]["train/grpo/kl"]), rel=1e-8, abs=1e-15)
    ea, eb = (load_file(d / "policy" / "adapter_model.safetensors") for d in (one, two))
    assert sorted(ea) == sorted(eb) and len(ea) > 0
    assert max((ea[k] - eb[k]).abs().max().item() for k in ea) < 1e-8
    assert not (two / "policy" / "model.safetensors").exists()  # the adapter only, as without FSDP


def test_full_loss_on_two_processes_equals_one_process(tmp_path):
    """loss=full (GRPO + SAMI + OT): OT's Sinkhorn cloud is the global batch's on any number of ranks, so DDP and
    FSDP (this one micro-batched too) reproduce the one-process step. OT solves in float32: its rounding bounds the
    agreement (1e-5)."""
    full = ["loss=full", "step.num_generations=4"]
    one, ddp, fsdp = tmp_path / "one", tmp_path / "ddp", tmp_path / "fsdp"
    a = _train(one, *full, "data.batch_size=16")
    b = _train(ddp, *full, "trainer=ddp_cpu", "data.batch_size=8")
    c = _train(fsdp, *full, "trainer=fsdp_cpu", "data.batch_size=8", "step.micro_batch_size=4")
    keys = (*KEYS, "train/sami/loss", "train/ot/divergence", "train/ot/points")
    _same_rows(a, b, keys=keys, rel=1e-5)
    _same_rows(a, c, keys=keys, rel=1e-5)
    assert float(a[1]["train/ot/divergence"]) > 0.0 and float(a[0]["train/sami/loss"]) != 0.0  # step 0: policy = ref
    wa, wb, wc = _weights(one / "policy"), _weights(ddp / "policy"), _weights(fsdp / "policy")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-6
    assert max((wa[k] - wc[k]).abs().max().item() for k in wa) < 1e-6


def test_shard_takes_the_blocks_from_no_split_modules_and_reshards_the_frozen_root(tiny_dir, tmp_path):
    """In one process (a one-rank gloo group): every block the model names in ``_no_split_modules`` and the root
    become FSDP units; after a forward without gradient the frozen reference holds only its shards again, while a
    policy's root keeps its gathered weights until its backward (why the reference's root reshards after forward)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
    from transformers import AutoModelForCausalLM

    from enigma_lightning.step.sharding import block_classes, is_fully_sharded, shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        ref, policy = (AutoModelForCausalLM.from_pretrained(tiny_dir) for _ in range(2))
        ref.requires_grad_(False).eval()
        assert {c.__name__ for c in block_classes(ref)} == set(ref._no_split_modules)
        shard(ref, mesh, frozen=True)
        shard(policy, mesh)
        assert is_fully_sharded(ref) and all(isinstance(p, DTensor) for p in ref.parameters())
        assert sum(isinstance(m, FSDPModule) for m in ref.modules()) == ref.config.num_hidden_layers + 1
        ids = torch.tensor([[5, 6, 7, 8]])
        with torch.no_grad():
            out = ref(input_ids=ids).logits
            policy(input_ids=ids)
        assert all(isinstance(p, DTensor) for p in ref.parameters())
        assert not all(isinstance(p, DTensor) for p in policy.parameters())
        plain = AutoModelForCausalLM.from_pretrained(tiny_dir)
        assert torch.allclose(out, plain(input_ids=ids).logits.detach())
    finally:
        dist.destroy_process_group()
