"""Information-geometry measures between two models' representations of the same inputs.

All functions take point clouds ``[N, D]`` (one row per token) and return Python floats; they compute in float64.
Known answers (tested): identical inputs give Sinkhorn divergence 0, linear CKA 1 and Fisher-Rao distance 0; TwoNN
recovers the dimension of a low-dimensional cloud; the effective rank of a rank-r matrix with equal singular values
is r.
"""

from __future__ import annotations

import torch
from torch import Tensor


def linear_cka(x: Tensor, y: Tensor) -> float:
    """Linear centred kernel alignment (Kornblith et al., 2019) of paired rows: x [N, D1], y [N, D2].
    1 for representations equal up to rotation and isotropic scaling, 0 for unrelated ones."""
    if x.size(0) != y.size(0):
        raise ValueError(f"linear_cka needs paired rows; got {x.size(0)} and {y.size(0)}")
    x, y = x.double(), y.double()
    x, y = x - x.mean(0), y - y.mean(0)
    hsic = (y.T @ x).square().sum()
    norm = (x.T @ x).square().sum().sqrt() * (y.T @ y).square().sum().sqrt()
    return float(hsic / norm) if norm > 0 else float("nan")


def twonn_dimension(x: Tensor, discard_fraction: float = 0.1) -> float:
    """Intrinsic dimension by TwoNN (Facco et al., 2017): the ratio mu = r2 / r1 of each point's second to first
    nearest-neighbour distance is Pareto(d) distributed; d is fitted by least squares on the empirical CDF,
    through the origin, after discarding the largest ``discard_fraction`` of mu. Duplicate points are dropped."""
    x = torch.unique(x.double(), dim=0)
    n = x.size(0)
    if n < 3:
        return float("nan")
    d = torch.cdist(x, x)
    d.fill_diagonal_(float("inf"))
    r = d.topk(2, dim=1, largest=False).values
    mu = (r[:, 1] / r[:, 0].clamp(min=1e-300)).sort().values
    keep = max(int(n * (1 - discard_fraction)), 2)
    mu = mu[:keep]
    f = torch.arange(1, keep + 1, dtype=torch.float64) / n
    xs, ys = mu.log(), -(1 - f).log()
    return float((xs * ys).sum() / xs.square().sum())


def effective_rank(x: Tensor, center: bool = True) -> float:
    """exp of the Shannon entropy of the normalised singular values (Roy & Vetterli, 2007): r for r equal
    singular values, between 1 and rank(x) in general. ``center`` removes the mean row first (a cloud's spread)."""
    eps = torch.finfo(x.dtype).eps if x.is_floating_point() else torch.finfo(torch.float64).eps
    x = x.double()
    if center:
        x = x - x.mean(0)
    s = torch.linalg.svdvals(x)
    # singular values below the input precision are zero (the rank tolerance of torch.linalg.matrix_rank)
    s = s[s > s.max() * max(x.shape) * eps] if s.numel() and s.max() > 0 else s[:0]
    if s.numel() == 0:
        return 0.0
    p = s / s.sum()
    return float(torch.exp(-(p * p.log()).sum()))


def fisher_rao(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """Fisher-Rao distance between categorical distributions, per row: 2 arccos(sum_v sqrt(p_v q_v)), in [0, pi].
    logits [..., V] -> [...]."""
    lp, lq = torch.log_softmax(logits_p.double(), -1), torch.log_softmax(logits_q.double(), -1)
    bc = torch.exp(0.5 * (lp + lq)).sum(-1).clamp(0.0, 1.0)
    return 2 * torch.arccos(bc)


def sinkhorn(x: Tensor, y: Tensor, epsilon: float = 0.05, normalize: bool = True, max_points: int = 1024,
             seed: int = 0) -> float:
    """Debiased Sinkhorn divergence (geomloss, the OT term's solver) between clouds; rows L2-normalised by default
    (a cost in [0, 2] whatever the layer's scale), at most ``max_points`` paired rows (same seeded subset)."""
    from ..losses.ot import sinkhorn_divergence

    if normalize:
        x, y = torch.nn.functional.normalize(x.float(), dim=-1), torch.nn.functional.normalize(y.float(), dim=-1)
    g = torch.Generator().manual_seed(seed)
    if x.size(0) == y.size(0) and x.size(0) > max_points:  # paired rows: the same subset of both
        idx = torch.randperm(x.size(0), generator=g)[:max_points]
        x, y = x[idx], y[idx]
    else:
        x = x[torch.randperm(x.size(0), generator=g)[:max_points]]
        y = y[torch.randperm(y.size(0), generator=g)[:max_points]]
    with torch.no_grad():
        return float(sinkhorn_divergence(x, y, epsilon=epsilon))


def cosine(a: Tensor, b: Tensor) -> float:
    """Cosine similarity of two vectors (nan when either is zero)."""
    a, b = a.double().flatten(), b.double().flatten()
    na, nb = a.norm(), b.norm()
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else float("nan")


def relative_shift(x: Tensor, y: Tensor) -> float:
    """|mean(x) - mean(y)| / |mean(y)|: how far the cloud's centre moved, relative to the reference's centre."""
    mx, my = x.double().mean(0), y.double().mean(0)
    return float((mx - my).norm() / my.norm()) if my.norm() > 0 else float("nan")


__all__ = ["cosine", "effective_rank", "fisher_rao", "linear_cka", "relative_shift", "sinkhorn", "twonn_dimension"]
