"""Symmetric InfoNCE over K x K score matrices, as in SAMI (Franken et al. 2024, arXiv 2404.14313).

``S[..., i, j]`` scores completion j (generated under principle variant j) when the prompt carries variant i. The loss
is the mean of the row-wise cross-entropy (which completion belongs to prompt i) and the column-wise one (which
prompt produced completion j), with the diagonal as targets and no temperature. ``log K - loss`` is an InfoNCE lower
bound on I(CoT; principle | question) in nats; the Sufficiency Index is that bound divided by ``log K`` (1 = every CoT
identifies its principle perfectly, about 0 = the CoT carries no trace of it). One implementation serves the SAMI
training term and the ``si`` command, so their numbers cannot drift apart.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _ce_diag(logits: Tensor) -> Tensor:
    """Cross-entropy of each row of [..., K, K] against the diagonal, per row: [..., K]."""
    return -torch.diagonal(torch.log_softmax(logits, dim=-1), dim1=-2, dim2=-1)


def per_matrix_infonce(scores: Tensor) -> Tensor:
    """(row CE + column CE) / 2 of each matrix in scores [..., K, K]: shape [...]."""
    row = _ce_diag(scores).mean(-1)
    col = _ce_diag(scores.transpose(-1, -2)).mean(-1)
    return (row + col) / 2


def symmetric_infonce(scores: Tensor) -> Tensor:
    """The SAMI loss: mean of :func:`per_matrix_infonce` over all matrices."""
    return per_matrix_infonce(scores).mean()


def infonce_metrics(scores: Tensor) -> dict[str, Tensor]:
    """loss, mi_bound (nats), mi_bound_bits, si, acc_row, acc_col for scores [..., K, K] (detached)."""
    s = scores.detach().float()
    k = s.size(-1)
    loss = symmetric_infonce(s)
    mi = math.log(k) - loss
    target = torch.arange(k, device=s.device)
    return {
        "loss": loss,
        "mi_bound": mi,
        "mi_bound_bits": mi / math.log(2),
        "si": mi / math.log(k),
        "acc_row": (s.argmax(-1) == target).float().mean(),
        "acc_col": (s.argmax(-2) == target).float().mean(),
    }
