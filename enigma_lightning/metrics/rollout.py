"""Per-step metrics of a rollout: rewards, advantages, format, lengths (``train/...``, see docs/metrics.md).

Values are detached 0-d tensors (or Python numbers where they come from text), never ``.item()``: the step does not
wait for the device; Lightning converts them when it logs."""

from __future__ import annotations

import torch

from ..rewards import is_strict
from .stats import nanstd


def rollout_metrics(ro, rewards: torch.Tensor, per_func: torch.Tensor, std_zero: torch.Tensor,
                    advantages: torch.Tensor, reward_names: list[str],
                    logged: dict[tuple[str, str], float] | None = None) -> dict[str, torch.Tensor | float]:
    """``logged``: {(reward function, name): value} the functions reported with TRL's ``log_metric``."""
    lengths = ro.lengths.float()
    m = {
        "train/reward/mean": torch.nanmean(rewards),
        "train/reward/std": nanstd(rewards) if rewards.numel() > 1 else 0.0,  # unscorable rows ignored
        "train/reward/frac_zero_std": std_zero.float().mean(),
        "train/advantages/abs_mean": advantages.detach().abs().mean(),
        "train/format/strict_rate": sum(is_strict(c) for c in ro.completions) / len(ro.completions),
        "train/completions/mean_length": lengths.mean(),
        "train/completions/max_length": lengths.max(),
        "train/completions/clipped_ratio": ro.truncated.float().mean(),
    }
    for i, name in enumerate(reward_names):
        m[f"train/reward/{name}/mean"] = torch.nanmean(per_func[:, i])
    for (name, key), value in (logged or {}).items():
        m[f"train/reward/{name}/logged/{key}"] = value
    return m


def sample_rows(step: int, prompts: list[str], completions: list[str], rewards: list[float],
                targets: list | None, extra: dict[str, list] | None = None) -> list[dict]:
    """One row per completion for ``samples.jsonl`` and the W&B samples table; ``extra``: the columns reward functions
    passed to TRL's ``log_extra(column, values)`` (one value per completion; a column of another length is left out)."""
    targets = targets if targets is not None else [None] * len(completions)
    columns = {k: list(v) for k, v in (extra or {}).items() if len(v) == len(completions)}
    return [{"step": step, "prompt": p, "completion": c, "reward": float(r), "target": t,
             **{k: v[i] for k, v in columns.items()}}
            for i, (p, c, r, t) in enumerate(zip(prompts, completions, rewards, targets, strict=True))]


def logprob_gap(policy_logps: torch.Tensor, engine_logps: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """``|policy log-prob - engine log-prob|`` of each sampled token (completion tokens up to EOS): the mismatch
    between the engine that sampled and the policy that trains, as a mean and a maximum (~0 when both compute in
    float32 with top_p = 1 and top_k = 0; top-p/top-k renormalise the engine's values over the tokens they keep)."""
    m = mask.bool()
    gap = (policy_logps.detach().float() - engine_logps.float()).abs()[m]
    if gap.numel() == 0:
        zero = torch.zeros((), device=gap.device)
        return {"train/rollout/logprob_gap/mean": zero, "train/rollout/logprob_gap/max": zero}
    return {"train/rollout/logprob_gap/mean": gap.mean(), "train/rollout/logprob_gap/max": gap.max()}
