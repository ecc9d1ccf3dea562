"""Non-finite steps are never applied: the run stops naming the step and the quantity (or skips it), and every
checkpoint left in the run folder holds finite weights."""

import json

import pytest
import torch

from enigma_lightning.commands.train import run
from enigma_lightning.runtime.guard import NonFiniteError

NAN = ["+reward.funcs.nan._target_=helpers.nan_reward", "+reward.funcs.nan._partial_=true", "allowed_targets=[helpers]"]
QUICK = ["experiment=smoke", "trainer.limit_val_batches=0", "callbacks.samples=null"]


def _finite(ckpt) -> bool:
    sd = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    return all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())


def test_nan_rewards_stop_the_run_before_the_step_is_applied(make_cfg, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError, match=r"step 0: reward functions returned NaN or inf: nan \(8 values\)\. "
                                             r"The step was not applied"):
        run(make_cfg(*QUICK, *NAN, out=out))
    assert not (out / "checkpoints" / "interrupted.ckpt").exists()  # no progress: nothing to keep
    assert json.loads((out / "summary.json").read_text())["status"].startswith("failed: NonFiniteError")


def test_skip_leaves_the_weights_alone_and_finishes(make_cfg, tmp_path, tiny_dir):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    summary = run(make_cfg(*QUICK, *NAN, "callbacks.guard.on_nonfinite=skip", "trainer.max_steps=2", out=out))
    assert summary["status"] == "finished" and summary["final"]["train/nonfinite_skipped"] == 1.0
    before = AutoModelForCausalLM.from_pretrained(tiny_dir).state_dict()
    after = AutoModelForCausalLM.from_pretrained(out / "policy").state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_diverging_run_stops_naming_the_step_and_keeps_finite_checkpoints(make_cfg, tmp_path):
    out = tmp_path / "run"
    signal = ["+reward.funcs.length._target_=helpers.length_reward", "+reward.funcs.length._partial_=true",
              "allowed_targets=[helpers]"]
    cfg = make_cfg(*QUICK, *signal, "optim=adamw_warmup", "optim.optimizer.lr=1e30", "step.max_grad_norm=null", "trainer.max_steps=6",
                   "callbacks.checkpoint.every_n_train_steps=1", out=out)
    # the warm-up's first step has lr 0 (a checkpoint of it is kept), the next diverges
    with pytest.raises(NonFiniteError, match=r"step [1-5]: .*not finite"):
        run(cfg)
    ckpts = list((out / "checkpoints").glob("*.ckpt"))
    assert ckpts and all(_finite(c) for c in ckpts)
