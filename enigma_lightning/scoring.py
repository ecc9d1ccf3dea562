"""SAMI's re-scoring: every completion of a question under every principle variant's prompt.

A rollout's rows are ordered (question q, variant i, r < m): completion j = i * m + r of question q was sampled
under variant i, G = K * m per question. ``forward(ro, rows=(prompt rows, completion rows), num_generations=n,
hidden=...)`` is the module's policy forward over paired rows (each prompt row repeated n times in a row, the
distinct prompts in the rollout's order). SAMI's scores [Q, i', i, r] are the mean token log-prob of completion
(i, r) under variant i''s prompt: :func:`sami_scores` (exact) computes them in GRPO's forward, one batch over every
cell; :func:`rescore_mismatched` (stop-gradient negatives) from GRPO's log-probs and a no-grad forward of its own.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .prefix import to_device

Forward = Callable[..., tuple[Tensor, dict]]


def _mean_logp(logps: Tensor, mask: Tensor) -> Tensor:
    mask = mask.to(logps.dtype)
    return (logps * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def sami_scores(forward: Forward, ro, g: int, k: int) -> tuple[Tensor, dict, Tensor]:
    """SAMI exact: one batched forward (with gradient) over every (question, prompt variant i', completion j) cell;
    GRPO's log-probs and hidden states are the diagonal rows (i' = the completion's own variant)."""
    m, dev = g // k, ro.completion_ids.device
    q = ro.prompt_ids.size(0) // g
    qi, vi, ji = (torch.arange(n, device=dev) for n in (q, k, g))
    p_rows = (qi[:, None, None] * g + vi[None, :, None] * m).expand(q, k, g).reshape(-1)
    c_rows = (qi[:, None, None] * g + ji[None, None, :]).expand(q, k, g).reshape(-1)
    logps, hidden = forward(ro, rows=(p_rows, c_rows), num_generations=g)
    scores = _mean_logp(logps, ro.completion_mask[c_rows]).view(q, k, k, m)  # [Q, i', i, r]
    ri = torch.arange(m, device=dev)
    diag = (qi[:, None, None] * k * g + vi[None, :, None] * (g + m) + ri[None, None, :]).reshape(-1)
    return logps[diag], {layer: h[diag] for layer, h in hidden.items()}, scores


def rescore_mismatched(forward: Forward, ro, g: int, k: int, logps: Tensor) -> Tensor:
    """``sami.negatives_grad=false``: SAMI's scores [Q, i', i, r] from GRPO's log-probs ``logps`` (rows (q, j), prompt
    = j's own variant: the matched cells, with their gradient) and one no-grad forward over the mismatched cells
    (completion j under a variant that did not produce it), which carry no gradient."""
    m, dev = g // k, ro.completion_ids.device
    q = ro.prompt_ids.size(0) // g
    matched = _mean_logp(logps, ro.completion_mask).view(q, g)
    own = torch.arange(g, device=dev) // m  # variant of completion j
    # rows (q, i', j) with i' != own(j), grouped by (q, i'): each group shares variant i''s prompt
    cells = [(qq, i, j) for qq in range(q) for i in range(k) for j in range(g) if j // m != i]
    p_rows = to_device([qq * g + i * m for qq, i, _ in cells], dev)
    c_rows = to_device([qq * g + j for qq, _, j in cells], dev)
    with torch.no_grad():
        off_logps, _ = forward(ro, rows=(p_rows, c_rows), num_generations=g - m, hidden=False)
        off = torch.zeros(q, k, g, dtype=matched.dtype, device=dev)
        qi, ii, ji = (to_device(x, dev) for x in zip(*cells, strict=True))
        off[qi, ii, ji] = _mean_logp(off_logps, ro.completion_mask[c_rows])
    is_own = own[None, None, :] == torch.arange(k, device=dev)[None, :, None]  # [1, K, G]
    return torch.where(is_own, matched[:, None, :], off).view(q, k, k, m)  # [Q, i', i, r]
