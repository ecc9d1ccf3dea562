"""GRPO advantages and loss: hand-derived values, and equality with TRL's own GRPOTrainer code."""

import math
import zlib
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from enigma_lightning.losses.grpo import grpo_loss
from enigma_lightning.metrics.stats import nanstd
from enigma_lightning.step.group import group_advantages


def test_advantages_hand_derived():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv, zero = group_advantages(r, 4, "group")
    std = math.sqrt(((0.5**2) * 4) / 3)  # Bessel-corrected std of [1,0,0,1]
    expected = torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-4)
    torch.testing.assert_close(adv[:4], expected)
    torch.testing.assert_close(adv[4:], torch.zeros(4))  # zero-variance group: no signal
    assert zero.tolist() == [False] * 4 + [True] * 4


def test_advantages_scale_modes():
    r = torch.tensor([1.0, 3.0, 0.0, 4.0])
    adv_none, _ = group_advantages(r, 2, "none")
    torch.testing.assert_close(adv_none, torch.tensor([-1.0, 1.0, -2.0, 2.0]))
    adv_batch, _ = group_advantages(r, 2, "batch")
    torch.testing.assert_close(adv_batch, torch.tensor([-1.0, 1.0, -2.0, 2.0]) / (r.std() + 1e-4))


def test_unscorable_completion_gets_zero_advantage():
    r = torch.tensor([1.0, float("nan"), 0.0, 2.0])
    adv, _ = group_advantages(r, 4, "group")
    assert adv[1] == 0
    mean = (1 + 0 + 2) / 3
    torch.testing.assert_close(adv[0], (1 - mean) / (nanstd(torch.tensor([1.0, 0.0, 2.0])) + 1e-4))


def test_sequence_level_loss_hand_derived():
    # One completion of 2 tokens, one of 1 token; advantages +1 / -1.
    logps = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]], requires_grad=True)
    old = torch.tensor([[-1.2, -2.0], [-0.4, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    adv = torch.tensor([1.0, -1.0])
    loss, m = grpo_loss(logps, old, adv, mask, loss_type="grpo", importance_sampling_level="sequence",
                        epsilon=0.2, epsilon_high=0.2)
    w1 = math.exp((0.2 + 0.0) / 2)  # mean log-ratio of completion 1 = 0.1
    w2 = math.exp(-0.1)
    # completion 1: adv > 0, w1 = 1.105 inside [0.8, 1.2]: loss -w1; completion 2: adv < 0: loss +w2
    expected = (-w1 + w2) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert m["clip_ratio"].item() == 0.0
    loss.backward()
    # d/dlogp of -w1 * 1 over 2 tokens (each 1/2 weight) then /2 for the mean over completions
    assert logps.grad[0, 0].item() == pytest.approx(-w1 / 2 / 2, rel=1e-6)
    assert logps.grad[1, 1].item() == 0.0  # masked token


def test_clipping_stops_gradient():
    logps = torch.tensor([[0.0]], requires_grad=True)
    old = torch.tensor([[-1.0]])  # ratio e > 1 + eps
    loss, m = grpo_loss(logps, old, torch.tensor([1.0]), torch.ones(1, 1), importance_sampling_level="token",
                        epsilon=0.2)
    loss.backward()
    assert loss.item() == pytest.approx(-1.2)
    assert logps.grad.item() == 0.0
    assert m["clip_ratio_high"].item() == 1.0


# ---- equality with TRL -------------------------------------------------------------------------------------------
trl = pytest.importorskip("trl", reason="TRL is in the test extra: pip install -e '.[test]'")


class _FakeTRL:
    """Just enough of a GRPOTrainer for its own ``_compute_loss`` to run on given log-probs."""

    def __init__(self, logps, loss_type, level, beta, eps, eps_high, max_len):
        self._logps = logps
        self.loss_type, self.importance_sampling_level, self.beta = loss_type, level, beta
        self.epsilon_low, self.epsilon_high = eps, eps_high
        self.top_entropy_quantile = 1.0
        self.off_policy_mask_threshold = None
        self.use_vllm = False
        self.vllm_importance_sampling_correction = False
        self.args = SimpleNamespace(use_bias_correction_kl=True, delta=None, steps_per_generation=1)
        self.model = SimpleNamespace(training=True)
        self.current_gradient_accumulation_steps = 1
        self.max_completion_length = max_len
        self._entropy_bonus_enabled = False
        self.aux_loss_enabled = False
        self.accelerator = SimpleNamespace(num_processes=1, reduce=lambda t, reduction="sum": t, gather=lambda t: t,
                                           gather_for_metrics=lambda t: t)
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        return self._logps, torch.zeros_like(self._logps), None


def _trl_loss(logps, old, ref, adv, mask, **kw):
    from trl.trainer.grpo_trainer import GRPOTrainer

    fake = _FakeTRL(logps, kw["loss_type"], kw["importance_sampling_level"], kw["beta"], kw["epsilon"],
                    kw["epsilon_high"], mask.size(1))
    b = mask.size(0)
    inputs = {"prompt_ids": torch.zeros(b, 1, dtype=torch.long), "prompt_mask": torch.ones(b, 1, dtype=torch.long),
              "completion_ids": torch.zeros_like(mask), "completion_mask": mask, "advantages": adv,
              "old_per_token_logps": old, "ref_per_token_logps": ref, "num_items_in_batch": mask.sum()}
    return GRPOTrainer._compute_loss(fake, None, inputs), fake._metrics["train"]


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_loss_equals_trl(loss_type, level, beta):
    g = torch.Generator().manual_seed(zlib.crc32(f"{loss_type}{level}{beta}".encode()))
    b, t = 6, 7
    base = -torch.rand(b, t, generator=g) * 3
    logps = (base + 0.3 * torch.randn(b, t, generator=g)).requires_grad_(True)
    old = base
    ref = base + 0.2 * torch.randn(b, t, generator=g)
    mask = (torch.arange(t).expand(b, t) < torch.randint(1, t + 1, (b, 1), generator=g)).long()
    adv = torch.randn(b, generator=g)
    kw = dict(loss_type=loss_type, importance_sampling_level=level, beta=beta, epsilon=0.2, epsilon_high=0.28)

    ours, metrics = grpo_loss(logps, old, adv, mask, ref, max_completion_length=t, num_items_in_batch=mask.sum(), **kw)
    (g_ours,) = torch.autograd.grad(ours, logps)
    theirs, trl_metrics = _trl_loss(logps, old, ref, adv, mask, **kw)
    (g_theirs,) = torch.autograd.grad(theirs, logps)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-5, atol=1e-7)
    assert metrics["clip_ratio"].item() == pytest.approx(trl_metrics["clip_ratio/region_mean"][0], abs=1e-6)
    if beta:
        assert metrics["kl"].item() == pytest.approx(trl_metrics["kl"][0], rel=1e-5)


def test_on_policy_default_matches_trl_without_old_logps():
    """num_iterations=1: old log-probs are the current ones detached (no extra forward), as in TRL."""
    logps = torch.randn(4, 5).requires_grad_(True)
    mask = torch.ones(4, 5, dtype=torch.long)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    ours, _ = grpo_loss(logps, None, adv, mask)
    theirs, _ = _trl_loss(logps, None, None, adv, mask, loss_type="grpo", importance_sampling_level="sequence",
                          beta=0.0, epsilon=3e-4, epsilon_high=4e-4)
    torch.testing.assert_close(ours, theirs)
    assert ours.item() == pytest.approx(-adv.mean().item())
