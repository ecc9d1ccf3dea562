"""Micro-batched steps: the loss and every gradient equal the one-batch step's (float64, tiny model), for every GRPO
loss_type, exact SAMI (questions whole per micro-batch), SAMI's cheaper settings and OT (gradient caching).

A micro-batch holds fewer prompts than the step, so prompts that share an opening may run it in a different layout
(one shared prefix forward, or each prompt whole): values agree to ~1e-8 relative in float64 there, not to the last
bit. With every prompt run whole in both (``whole_prompts``), the gradients agree to float64 rounding."""

import pytest
import torch

COMMON = ("experiment=smoke", "model.dtype=float64", "step.num_generations=4")


def _pair(make_cfg, *overrides, micro=2):
    """Two modules with the same weights, one stepping whole, one in micro-batches of ``micro`` rows."""
    from enigma_lightning.commands.train import build_module

    whole = build_module(make_cfg(*COMMON, *overrides))
    split = build_module(make_cfg(*COMMON, *overrides, f"step.micro_batch_size={micro}"))
    split.load_state_dict(whole.state_dict())
    return whole, split


def _same_step(make_cfg, *overrides, micro=2, rtol=1e-6, atol=1e-9, whole_prompts=False):
    from hydra.utils import instantiate

    whole, split = _pair(make_cfg, *overrides, micro=micro)
    dm = instantiate(make_cfg(*COMMON, *overrides).data)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    buf = whole._new_rollout(batch)
    buf["advantages"] = torch.linspace(-1, 1, buf["advantages"].numel(), dtype=torch.float64)  # a gradient to compare
    for m in (whole, split):
        m._new_rollout = lambda b, buf=buf: buf
        m.forwards.sharded = whole_prompts  # every prompt run whole, as under FSDP
    loss_whole = whole.forward_backward(batch)
    loss_split = split.forward_backward(batch)
    assert split.last_micro_batches > 1 and whole.last_micro_batches == 1
    torch.testing.assert_close(loss_split, loss_whole, rtol=rtol, atol=atol)
    grads = [(n, p.grad, q.grad) for (n, p), q in zip(whole.named_parameters(), split.parameters(), strict=True)
             if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for _, g, _ in grads)
    for name, g_whole, g_split in grads:
        if g_whole is None:
            assert g_split is None or not g_split.any(), name
        else:
            torch.testing.assert_close(g_split, g_whole, rtol=rtol, atol=atol, msg=name)
    return whole, split


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_grpo_micro_batches_equal_the_whole_step(make_cfg, loss_type):
    _same_step(make_cfg, "loss=grpo", f"grpo.loss_type={loss_type}", "grpo.importance_sampling_level=token",
               "grpo.beta=0.04")


def test_gradient_caching_is_exact_to_float64_rounding(make_cfg):
    _same_step(make_cfg, "loss=[grpo,sami]", "grpo.beta=0.04", rtol=1e-12, atol=1e-15, whole_prompts=True)


def test_exact_sami_and_ot_micro_batches_equal_the_whole_step(make_cfg):
    # OT's solver runs in float32 (as in training), on hidden states that differ in their last float64 bits between
    # the micro-batched and the whole forward: its share agrees to float32 rounding
    _same_step(make_cfg, "loss=full", "ot.weight=10", rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("setting", ["sami.negatives_grad=false", "sami.critic=encoder"])
def test_cheaper_sami_settings_micro_batched(make_cfg, setting):
    _same_step(make_cfg, "loss=[grpo,sami]", setting)


def test_micro_batches_keep_prompts_whole(make_cfg):
    from enigma_lightning.losses.base import Needs
    from enigma_lightning.step.forwards import StepForwards

    f = StepForwards(Needs(), 1.0, micro_batch_size=5)
    assert f.chunks(16, 4) == [slice(0, 4), slice(4, 8), slice(8, 12), slice(12, 16)]
    assert StepForwards(Needs(), 1.0, micro_batch_size=3).chunks(8, 4) == [slice(0, 4), slice(4, 8)]  # one prompt
    assert StepForwards(Needs(), 1.0, micro_batch_size=None).chunks(8, 4) == [slice(0, 8)]


def test_micro_batched_run_trains_and_resumes_the_same(make_cfg, tmp_path):
    from enigma_lightning.commands.train import run

    summary = run(make_cfg("experiment=smoke", "loss=full", "step.micro_batch_size=4", out=tmp_path / "run"))
    assert summary["status"] == "finished" and summary["global_step"] == 4
