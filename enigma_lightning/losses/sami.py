"""SAMI-style symmetric InfoNCE auxiliary between principles and chains of thought.

Reconstruction (DESIGN section 2): inside GRPO each question's G completions are generated under K principle
variants (G = K * m; the variants are the set's text, its antithesis, and further contrasts), and each completion
remembers its variant. Two critics score completion j against variant i:

- ``logprob`` (SAMI exact): ``S[i, j]`` = mean per-token log-prob of completion j when the prompt carries variant i.
  All K x G cells of a question come from one batched forward (:func:`sami_rows`, declared as the term's
  :class:`~.base.ScoredRows`; each variant's prompt runs once, its KV cache repeated over the G completions), whose
  diagonal rows serve the step's own log-probs. With ``negatives_grad=false`` the mismatched cells are scored
  without gradient by the term's ``prepare`` hook instead (:func:`mismatched_rows`).
- ``encoder``: the frozen principle encoder embeds the K variant texts; a learned linear projection of the policy's
  mean-pooled completion hidden states (last layer) is compared with them by cosine similarity / ``temperature``.
  The projection and the policy train; the encoder does not.

For each question and each r < m the K completions (one per variant) form one K x K matrix; the loss is the
symmetric cross-entropy with diagonal targets and no temperature (SAMI's published loss), averaged over matrices.

``si`` (the Sufficiency Index before training) builds the same matrices with :func:`sami_rows` and
:func:`cell_scores` (m = 1).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..metrics.infonce import infonce_metrics, symmetric_infonce
from .base import Forward, Layout, LossTerm, Needs, ScoredRows, StepBatch

CRITICS = ("logprob", "encoder")


def mean_logp(logps: Tensor, mask: Tensor) -> Tensor:
    """Mean token log-prob per row: logps, mask [R, T] -> [R]."""
    mask = mask.to(logps.dtype)
    return (logps * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def sami_rows(layout: Layout, device=None) -> tuple[Tensor, Tensor, Tensor]:
    """Every (question q, prompt variant i', completion j) cell as rows ``(prompt rows, completion rows)`` [Q*K*G],
    grouped by (q, i') so each group shares variant i''s prompt (G rows per prompt row), and ``diag`` [Q*G]: where the
    rollout's own pairs (i' = the completion's variant) sit among them, in the rollout's row order."""
    q, k, g, m = layout.num_questions, layout.num_variants, layout.num_generations, layout.per_variant
    qi, vi, ji, ri = (torch.arange(n, device=device) for n in (q, k, g, m))
    p_rows = (qi[:, None, None] * g + vi[None, :, None] * m).expand(q, k, g).reshape(-1)
    c_rows = (qi[:, None, None] * g + ji[None, None, :]).expand(q, k, g).reshape(-1)
    diag = (qi[:, None, None] * k * g + vi[None, :, None] * (g + m) + ri[None, None, :]).reshape(-1)
    return p_rows, c_rows, diag


def cell_scores(logps: Tensor, mask: Tensor, layout: Layout) -> Tensor:
    """Scores [Q, i', i, r] (prompt variant, completion variant, repeat) from the log-probs [Q*K*G, T] of
    :func:`sami_rows`' cells and their completions' mask."""
    q, k, m = layout.num_questions, layout.num_variants, layout.per_variant
    return mean_logp(logps, mask).view(q, k, k, m)


def mismatched_rows(layout: Layout) -> tuple[list[tuple[int, int, int]], list[int], list[int]]:
    """The cells (q, i', j) whose completion j was not sampled under variant i', grouped by (q, i') (G - m rows per
    prompt row), with their prompt and completion rows (host lists)."""
    q, k, g, m = layout.num_questions, layout.num_variants, layout.num_generations, layout.per_variant
    cells = [(qq, i, j) for qq in range(q) for i in range(k) for j in range(g) if j // m != i]
    return cells, [qq * g + i * m for qq, i, _ in cells], [qq * g + j for qq, _, j in cells]


class SAMILoss(LossTerm):
    """The SAMI term (``conf/loss/sami.yaml``, settings under ``sami.*``)."""

    name = "sami"

    def __init__(self, *, weight: float, num_variants: int, critic: str, temperature: float, layer: int,
                 negatives_grad: bool):
        super().__init__(weight=weight)
        if critic not in CRITICS:
            raise ValueError(f"sami.critic must be one of {CRITICS}; got {critic!r}")
        self.num_variants, self.critic, self.temperature, self.layer = num_variants, critic, temperature, layer
        # logprob critic: False scores the mismatched (completion, variant) cells without gradient (a stop-gradient
        # on the negatives): the same loss value, half the SAMI backward, but not SAMI's exact gradient
        self.negatives_grad = negatives_grad
        self.projection: nn.Linear | None = None

    def needs(self) -> Needs:
        if self.critic == "encoder":
            return Needs(num_variants=self.num_variants, hidden_layers=(self.layer,), principle_embeddings=True)
        return Needs(num_variants=self.num_variants, scored_rows=self.negatives_grad)

    def setup(self, *, hidden_size: int, encoder_dim: int | None) -> None:
        """Build the encoder critic's projection (policy hidden size -> encoder embedding size)."""
        if self.critic == "encoder":
            if encoder_dim is None:
                raise ValueError("sami.critic=encoder needs a principle encoder; set encoder=minilm or sami.critic=logprob")
            self.projection = nn.Linear(hidden_size, encoder_dim)

    def scored_rows(self, layout: Layout, device) -> ScoredRows | None:
        """Exact SAMI: every cell, with gradient, in the step's own forward (the diagonal serves the step)."""
        if self.critic != "logprob" or not self.negatives_grad:
            return None
        p_rows, c_rows, diag = sami_rows(layout, device)
        return ScoredRows(p_rows, c_rows, num_generations=layout.num_generations, own=diag)

    def prepare(self, forward: Forward, batch: StepBatch) -> Tensor | None:
        """``negatives_grad=false``: scores [Q, i', i, r] from the step's log-probs (the matched cells, with their
        gradient) and one no-grad forward over the mismatched cells."""
        if self.critic != "logprob" or self.negatives_grad:
            return None
        layout, dev = batch.layout, batch.logps.device
        q, k, g, m = layout.num_questions, layout.num_variants, layout.num_generations, layout.per_variant
        matched = mean_logp(batch.logps, batch.eos_mask).view(q, g)
        cells, p_list, c_list = mismatched_rows(layout)
        c_rows = torch.tensor(c_list, device=dev)
        with torch.no_grad():
            off_logps, _ = forward(rows=(torch.tensor(p_list, device=dev), c_rows), num_generations=g - m,
                                   hidden=False)
            off = torch.zeros(q, k, g, dtype=matched.dtype, device=dev)
            qi, ii, ji = (torch.tensor(x, device=dev) for x in zip(*cells, strict=True))
            off[qi, ii, ji] = mean_logp(off_logps, batch.eos_mask[c_rows])
        own = torch.arange(g, device=dev) // m  # variant of completion j
        is_own = own[None, None, :] == torch.arange(k, device=dev)[None, :, None]  # [1, K, G]
        return torch.where(is_own, matched[:, None, :], off).view(q, k, k, m)  # [Q, i', i, r]

    def matrices(self, batch: StepBatch) -> Tensor:
        """Score matrices [Q * m, K, K] (rows: prompt variant, columns: completion's variant)."""
        k, layout = self.num_variants, batch.layout
        if self.critic == "logprob":
            if self.negatives_grad:
                _, c_rows, _ = sami_rows(layout, batch.logps.device)
                s = cell_scores(batch.scored[self.name], batch.eos_mask[c_rows], layout)
            else:
                s = batch.prepared[self.name]  # [Q, K (prompt variant), K (completion variant), m]
            return s.permute(0, 3, 1, 2).reshape(-1, k, k)
        hidden = batch.hidden[self.layer]  # [B, T, D], rows ordered (question, variant, r)
        # pooled over the completion's own tokens (eos_mask), as the logprob critic scores them: the loss mask is
        # all zero for a truncated completion under step.mask_truncated_completions, which would pool nothing
        mask = batch.eos_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # [B, D]
        z = nn.functional.normalize(self.projection(pooled.float()), dim=-1)  # [B, E]
        e = nn.functional.normalize(batch.principle_embeddings.to(z), dim=-1)  # [K, E]
        sims = (z @ e.T) / self.temperature  # [B, K]: completion x variant
        sims = sims.view(-1, k, layout.per_variant, k)  # [Q, completion variant, r, prompt variant]
        return sims.permute(0, 2, 3, 1).reshape(-1, k, k)

    def forward(self, batch: StepBatch) -> tuple[Tensor, dict[str, Tensor]]:
        s = self.matrices(batch)
        metrics = infonce_metrics(s)
        metrics.pop("loss")
        return symmetric_infonce(s), metrics
