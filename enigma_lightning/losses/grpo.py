"""GRPO's clipped surrogate and KL, numerically equal to TRL's ``GRPOTrainer`` (the group-relative advantages it
reads are the step's: :mod:`enigma_lightning.step.group`).

Variant: ENIGMA trains with GRPO using *sequence-level* importance weights (GSPO): the ratio is
``exp(mean over completion tokens of (logp - old_logp))``, one per completion, so the default here is
``importance_sampling_level="sequence"`` (TRL's default is ``token``; both are supported). Everything else follows
TRL 1.x ``GRPOTrainer._compute_loss`` and its advantage computation (``multi_objective_aggregation=
"sum_then_normalize"``): ``scale_rewards`` group/batch/none with the 1e-4 epsilon, NaN-aware statistics,
zero advantage for unscorable completions, asymmetric clipping (``epsilon``, ``epsilon_high``), the k3 KL to the
frozen reference weighted by ``beta`` (times the importance weight when ``kl_bias_correction``, TRL's default),
and the loss aggregations ``grpo`` / ``bnpo`` / ``dr_grpo`` / ``dapo``. Tests compare against TRL's own code.

Rollout correction (``rollout_correction``): when another engine sampled (``rollout/engine=vllm``), its token
probabilities differ from the policy's wherever the two compute differently (bf16 kernels, another attention), so the
"on-policy" samples are slightly off-policy. Truncated importance sampling (TIS; F. Yao, L. Liu et al., "Your
Efficient RL Framework Secretly Brings You Off-Policy RL Training", 2025; TRL's
``vllm_importance_sampling_correction``, verl's ``tis_imp_ratio_cap``) weights each token's surrogate by
``min(exp(old_logp - engine_logp), cap)``, detached, before the KL is added, as TRL does.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import LossTerm, Needs, StepBatch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
CORRECTIONS = ("auto", "tis", "none")
IS_LEVELS = ("token", "sequence")


def grpo_loss(
    logps: Tensor,
    old_logps: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    ref_logps: Tensor | None = None,
    *,
    loss_type: str = "grpo",
    importance_sampling_level: str = "sequence",
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    kl_bias_correction: bool = True,
    max_completion_length: int | None = None,
    num_items_in_batch: Tensor | float | None = None,
    sampling_logps: Tensor | None = None,
    rollout_is_cap: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The clipped GRPO surrogate (+ beta * k3 KL). Shapes: logps/old_logps/ref_logps/mask [B, T], advantages [B].

    Returns ``(loss, metrics)`` with ``kl``, ``clip_ratio`` (region), ``clip_ratio_low``, ``clip_ratio_high`` as
    detached tensors (means over completion tokens, or over completions at sequence level, as TRL logs them).
    ``sampling_logps`` and ``rollout_is_cap``: truncated importance sampling of the engine that sampled (module
    docstring), with ``rollout_is_weight`` and ``rollout_is_clipped`` in the metrics.
    """
    mask = mask.to(logps.dtype)
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    old_logps = logps.detach() if old_logps is None else old_logps
    adv = advantages.unsqueeze(1)  # [B, 1]
    log_ratio = logps - old_logps  # [B, T]
    if importance_sampling_level == "token":
        log_w = log_ratio
    elif importance_sampling_level == "sequence":
        log_w = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)  # [B, 1]
    else:
        raise ValueError(f"grpo.importance_sampling_level must be one of {IS_LEVELS}; got {importance_sampling_level!r}")
    coef_1 = torch.exp(log_w)
    coef_2 = torch.clamp(coef_1, 1 - epsilon, 1 + epsilon_high)
    per_token_loss = -torch.min(coef_1 * adv, coef_2 * adv)  # [B, T] or [B, 1]

    metrics: dict[str, Tensor] = {}
    if rollout_is_cap is not None and sampling_logps is not None:
        raw = torch.exp(old_logps.detach() - sampling_logps.to(old_logps.dtype))
        is_weight = raw.clamp(max=rollout_is_cap)
        per_token_loss = per_token_loss * is_weight  # [B, T]
        metrics["rollout_is_weight"] = (is_weight * mask).sum() / mask.sum().clamp(min=1.0)
        metrics["rollout_is_clipped"] = ((raw > rollout_is_cap).to(mask.dtype) * mask).sum() / mask.sum().clamp(min=1.0)
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("grpo.beta != 0 needs reference log-probs")
        per_token_kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1  # k3 estimator, [B, T]
        if kl_bias_correction:
            per_token_kl = per_token_kl * coef_1
        per_token_loss = per_token_loss + beta * per_token_kl
        metrics["kl"] = _masked_mean(per_token_kl.detach(), mask)

    if loss_type == "grpo":
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        length = max_completion_length if max_completion_length is not None else mask.size(1)
        loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * length)
    elif loss_type == "dapo":
        normaliser = mask.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch)
        loss = (per_token_loss * mask).sum() / normaliser.clamp(min=1.0)
    else:
        raise ValueError(f"grpo.loss_type must be one of {LOSS_TYPES}; got {loss_type!r}.")

    with torch.no_grad():
        low = ((coef_1 < 1 - epsilon) & (adv < 0)).to(logps.dtype)
        high = ((coef_1 > 1 + epsilon_high) & (adv > 0)).to(logps.dtype)
        metrics["clip_ratio_low"] = _masked_mean(low, mask)
        metrics["clip_ratio_high"] = _masked_mean(high, mask)
        metrics["clip_ratio"] = _masked_mean(torch.maximum(low, high), mask)
    return loss, metrics


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    if x.size(1) == 1:  # sequence level: one value per completion
        return x.mean()
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


class GRPOLoss(LossTerm):
    """The GRPO term (``conf/loss/grpo.yaml``, settings under ``grpo.*``): the clipped surrogate and the KL.
    The group it learns from (G, advantages, rollout reuse) is the step's (:mod:`enigma_lightning.step.group`)."""

    name = "grpo"

    def __init__(self, *, weight: float, loss_type: str, importance_sampling_level: str, epsilon: float,
                 epsilon_high: float | None, beta: float, kl_bias_correction: bool, rollout_correction: str,
                 rollout_correction_cap: float):
        super().__init__(weight=weight)
        if rollout_correction not in CORRECTIONS:
            raise ValueError(f"grpo.rollout_correction must be one of {CORRECTIONS}; got {rollout_correction!r}")
        self.rollout_correction, self.rollout_correction_cap = rollout_correction, rollout_correction_cap
        self.loss_type, self.importance_sampling_level = loss_type, importance_sampling_level
        self.epsilon, self.epsilon_high, self.beta, self.kl_bias_correction = epsilon, epsilon_high, beta, kl_bias_correction

    def needs(self) -> Needs:
        return Needs(reference_logps=self.beta != 0.0, global_token_count=self.loss_type == "dapo")

    def forward(self, batch: StepBatch) -> tuple[Tensor, dict[str, Tensor]]:
        return grpo_loss(
            batch.logps,
            batch.old_logps,
            batch.advantages,
            batch.completion_mask,
            batch.ref_logps,
            loss_type=self.loss_type,
            importance_sampling_level=self.importance_sampling_level,
            epsilon=self.epsilon,
            epsilon_high=self.epsilon_high,
            beta=self.beta,
            kl_bias_correction=self.kl_bias_correction,
            max_completion_length=batch.max_completion_length,
            num_items_in_batch=batch.num_items_in_batch,
            sampling_logps=batch.sampling_logps,
            rollout_is_cap=self.rollout_correction_cap if self.corrects(batch) else None,
        )

    def corrects(self, batch: StepBatch) -> bool:
        """Whether TIS applies this step: an engine's log-probs are there and ``tis``, or ``auto`` and the engine
        computes in a lower precision than the policy's float32."""
        if batch.sampling_logps is None or self.rollout_correction == "none":
            return False
        return self.rollout_correction == "tis" or not batch.sampling_exact
