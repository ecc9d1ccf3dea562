"""The group a GRPO step learns from: G completions per prompt, group-relative advantages, rollout reuse and
truncation masking (``conf/step/default.yaml``, settings under ``step.*``). These belong to the step, not to any loss
term: every term reads the same rollout.

Advantages follow TRL 1.x ``GRPOTrainer`` (``multi_objective_aggregation="sum_then_normalize"``): ``scale_rewards``
group/batch/none with the 1e-4 epsilon, NaN-aware statistics, zero advantage for unscorable completions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..metrics.stats import nanstd

SCALE_REWARDS = ("group", "batch", "none")
ADV_EPS = 1e-4


@dataclass(frozen=True, kw_only=True)
class GroupConfig:
    """``step.*``: defaults live in ``conf/step/default.yaml``."""

    num_generations: int  # G completions per prompt
    num_iterations: int  # optimiser steps per rollout (> 1 keeps the sampling policy's log-probs as old_logps)
    scale_rewards: str  # group | batch | none
    mask_truncated_completions: bool  # completions that hit max_new_tokens leave the loss
    micro_batch_size: int | None  # rows per policy forward/backward (None: the whole step; see .microbatch)
    max_grad_norm: float | None  # clip the gradient's global norm before the optimiser step (None: off)

    def advantages(self, rewards: Tensor) -> tuple[Tensor, Tensor]:
        return group_advantages(rewards, self.num_generations, self.scale_rewards)

    def loss_mask(self, completion_mask: Tensor, truncated: Tensor) -> Tensor:
        """The completion mask the terms see: truncated completions masked out when ``mask_truncated_completions``."""
        if not self.mask_truncated_completions:
            return completion_mask
        return completion_mask * (~truncated).unsqueeze(1).to(completion_mask.dtype)


def group_advantages(rewards: Tensor, num_generations: int, scale_rewards: str = "group") -> tuple[Tensor, Tensor]:
    """Group-relative advantages.

    rewards: [N] total reward per completion (NaN = unscorable), consecutive groups of ``num_generations``.
    Returns ``(advantages [N], std_is_zero [N] bool)``. Unscorable completions get advantage 0.
    """
    grouped = rewards.view(-1, num_generations)  # [N/G, G]
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(num_generations)  # [N]
    if scale_rewards in ("group", "none"):
        std = nanstd(grouped, dim=1).repeat_interleave(num_generations)
    elif scale_rewards == "batch":
        std = nanstd(rewards).expand_as(rewards)
    else:
        raise ValueError(f"step.scale_rewards must be one of {SCALE_REWARDS}; got {scale_rewards!r}.")
    advantages = rewards - mean
    if scale_rewards != "none":
        advantages = advantages / (std + ADV_EPS)
    std_is_zero = torch.isclose(std, torch.zeros_like(std))
    return torch.nan_to_num(advantages, nan=0.0), std_is_zero
