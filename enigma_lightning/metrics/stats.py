"""Small statistics: NaN-aware ones shared by advantages and metrics (unscorable completions carry NaN rewards), and
the rank statistics of the SI claim report (Spearman with ties, its seed bootstrap)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def nanstd(x: Tensor, dim: int | None = None) -> Tensor:
    """Bessel-corrected standard deviation ignoring NaNs (NaN where fewer than two values)."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    var = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True)
    correction = torch.where(count > 1, count / (count - 1), torch.full_like(var, float("nan")))
    std = torch.sqrt(var * correction)
    return std.squeeze() if dim is None else std.squeeze(dim)


# rank statistics of the SI claim report (commands/claim.py)


def ranks(x) -> np.ndarray:
    """1-based ranks along the last axis, ties sharing the mean of the ranks they span (``[10, 20, 20, 30]`` ->
    ``[1, 2.5, 2.5, 4]``): the values below it, plus the mean position among its equals. Values within 1e-12 of the
    largest magnitude are equal (a difference of two equal means is 0 up to rounding, and rounding is no ranking)."""
    x = np.asarray(x, dtype=float)
    tol = 1e-12 * np.abs(x).max(-1, keepdims=True)[..., None] if x.size else 0.0
    diff = x[..., None, :] - x[..., :, None]  # [..., i, j] = x_j - x_i
    equal = (np.abs(diff) <= tol).sum(-1)
    below = ((diff < 0) & (np.abs(diff) > tol)).sum(-1)
    return below + (equal + 1) / 2


def _rho_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's rho of ``x`` with each row of ``y`` (NaN where either has a single value)."""
    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(-1, keepdims=True), ry - ry.mean(-1, keepdims=True)
    den = np.sqrt((rx**2).sum(-1) * (ry**2).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (rx * ry).sum(-1) / np.where(den > 0, den, 1.0), np.nan)


def spearman(x, y) -> float:
    """Spearman's rho with ties: Pearson's correlation of the (tie-averaged) ranks. NaN when fewer than 2 points or
    when either variable has a single value (no ranking to compare)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"spearman: two lists of the same length; got {x.shape} and {y.shape}")
    if len(x) < 2:
        return float("nan")
    return float(_rho_rows(x, y[None])[0])


def bootstrap_rho(si: list[float], values: list[list[float]], n: int = 2000, seed: int = 0,
                  ci: float = 0.95) -> tuple[float, float] | None:
    """Percentile interval of rho(SI, per-set mean) when each set's seeds (``values[s]``) are resampled with
    replacement. None when no set has two seeds (nothing to resample) or no resample gives a defined rho."""
    if all(len(v) < 2 for v in values):
        return None
    rng = np.random.default_rng(seed)
    means = np.stack([np.asarray(v, float)[rng.integers(0, len(v), (n, len(v)))].mean(1) for v in values], axis=1)
    rhos = _rho_rows(np.asarray(si, dtype=float), means)
    rhos = rhos[np.isfinite(rhos)]
    if not len(rhos):
        return None
    lo, hi = np.quantile(rhos, [(1 - ci) / 2, (1 + ci) / 2])
    return float(lo), float(hi)
