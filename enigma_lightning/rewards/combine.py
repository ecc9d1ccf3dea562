"""Named reward functions with weights, combined as TRL's ``sum_then_normalize`` does (before group advantages)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from .xml import RewardFn


class RewardModel:
    """Named reward functions with weights; combines them the way TRL's ``sum_then_normalize`` does."""

    def __init__(self, funcs: Mapping[str, RewardFn], weights: Mapping[str, float] | None = None):
        if not funcs:
            raise ValueError("reward.funcs is empty; add at least one reward function.")
        self.names = list(funcs)
        self.funcs = [funcs[n] for n in self.names]
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(self.names))
        if unknown:
            raise ValueError(f"reward.weights names {unknown}, which are not in reward.funcs {self.names}.")
        self.weights = torch.tensor([float(weights.get(n, 1.0)) for n in self.names])
        self.last_nonfinite: dict[str, int] = {}  # per function: values of the last call that were NaN or inf

    def __call__(self, prompts: Sequence, completions: Sequence[str], **columns) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(per_func [N, F] with NaN for None, total [N])``; total is NaN where every function gave None."""
        cols, self.last_nonfinite = [], {}
        for name, fn in zip(self.names, self.funcs, strict=True):
            values = fn(prompts=prompts, completions=completions, **columns)
            if len(values) != len(completions):
                raise ValueError(f"reward function {name!r} returned {len(values)} values for {len(completions)}.")
            cols.append([math.nan if v is None else float(v) for v in values])
            bad = sum(v is not None and not math.isfinite(float(v)) for v in values)  # None: unscorable, not bad
            if bad:
                self.last_nonfinite[name] = bad
        per_func = torch.tensor(cols, dtype=torch.float32).T.reshape(len(completions), len(self.names))
        total = (per_func * self.weights.unsqueeze(0)).nansum(dim=1)
        total[torch.isnan(per_func).all(dim=1)] = math.nan
        return per_func, total
