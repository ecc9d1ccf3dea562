"""The forwards of one training step, computed once for the union of what the selected terms need.

:class:`StepForwards` runs the policy (log-probs of the rollout's own rows, the hidden states the terms read, and the
extra rows terms declare as :class:`~enigma_lightning.losses.base.ScoredRows`) and the frozen reference (log-probs
and hidden states, only what some term needs). It never names a term.

The policy's forwards are :class:`Request` s: the rows one forward scores. With ``step.micro_batch_size`` every
forward without gradient runs in chunks of at most that many rows (each prompt's rows kept together, so prompt
sharing still holds), and :mod:`.microbatch` runs the gradient-carrying ones chunk by chunk.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..losses.base import Layout, LossTerm, Needs
from ..rollout.logprobs import per_token_logps


@dataclass(frozen=True)
class Request:
    """One policy forward: completion ``completion_rows[r]`` after the prompt of row ``prompt_rows[r]`` (None: the
    rollout's own rows), each prompt row repeated ``num_generations`` times in a row. ``term``: the term that asked
    (None: the step's own rows); ``own``: where the step's own rows sit among these rows, when this forward serves
    the step too; ``grad``: whether the loss differentiates through it; ``hidden``: whether it returns hidden states."""

    prompt_rows: Tensor | None
    completion_rows: Tensor | None
    num_generations: int
    term: str | None = None
    own: Tensor | None = None
    grad: bool = True
    hidden: bool = True

    def rows(self, ro) -> tuple[Tensor, Tensor]:
        if self.prompt_rows is not None:
            return self.prompt_rows, self.completion_rows
        every = torch.arange(ro.completion_ids.size(0), device=ro.completion_ids.device)
        return every, every

    def size(self, ro) -> int:
        return ro.completion_ids.size(0) if self.prompt_rows is None else self.prompt_rows.numel()


class StepForwards:
    """Policy and reference forwards over a rollout's rows (the module owns the models; this owns the plan)."""

    def __init__(self, needs: Needs, temperature: float, micro_batch_size: int | None = None):
        self.needs, self.temperature, self.micro_batch_size = needs, temperature, micro_batch_size
        # the policy forward's logits take their own gradient in the backward (one logits-sized buffer, not two);
        # False to backward more than once through a step's graph (retain_graph: per-term gradient probes)
        self.overwrite_logits = True
        self.sharded = False  # FSDP: every prompt runs whole (every rank runs the same forwards)
        self.reference_prefixes: dict = {}  # the frozen reference's KV cache of shared prompt openings

    def _prefixes(self, ro):
        return ro.prefixes.ungrouped() if self.sharded and ro.prefixes is not None else ro.prefixes

    def chunks(self, total: int, num_generations: int) -> list[slice]:
        """Row slices of at most ``micro_batch_size`` rows, whole prompts each (at least one prompt's rows)."""
        if not self.micro_batch_size or self.micro_batch_size >= total:
            return [slice(0, total)]
        size = max(num_generations, self.micro_batch_size // num_generations * num_generations)
        return [slice(a, min(a + size, total)) for a in range(0, total, size)]

    def forward(self, model: nn.Module, ro, rows: tuple[Tensor, Tensor] | None = None,
                num_generations: int | None = None, compute_logps: bool = True, prefix_store: dict | None = None,
                hidden: bool = True, layers: tuple[int, ...] | None = None, per_prompt: int = 1):
        """Completion log-probs (None when not ``compute_logps``) and {layer: completion-token hidden states
        [B, T, D]} for ``layers`` (default: the layers the policy's terms read; none when not ``hidden``). ``rows``
        optionally gives (prompt rows, completion rows) to pair; by construction each prompt row repeats
        ``num_generations`` times in a row and the distinct prompts are the rollout's, in its order (no check, no
        device sync). Without gradient the rows run in micro-batches when ``micro_batch_size`` is set."""
        n = num_generations or per_prompt
        request = Request(*(rows if rows is not None else (None, None)), num_generations=n)
        layers = (self.needs.hidden_layers if layers is None else layers) if hidden else ()
        parts = self.chunks(request.size(ro), n) if not torch.is_grad_enabled() else [slice(None)]
        outs = [self.run(model, ro, request, part, layers, compute_logps, prefix_store) for part in parts]
        if len(outs) == 1:
            return outs[0]
        logps = torch.cat([o[0] for o in outs]) if compute_logps else None
        return logps, {layer: torch.cat([o[1][layer] for o in outs]) for layer in layers}

    def run(self, model: nn.Module, ro, request: Request, part: slice, layers: tuple[int, ...],
            compute_logps: bool = True, prefix_store: dict | None = None):
        """One forward over ``request``'s rows ``part`` (a slice of whole prompts)."""
        n, plan = request.num_generations, self._prefixes(ro)
        if part == slice(None) or (part.start == 0 and part.stop >= request.size(ro)):
            p_rows, c_rows = (request.prompt_rows, request.completion_rows) if request.prompt_rows is not None \
                else (slice(None), slice(None))
        else:
            p_rows, c_rows = (r[part] for r in request.rows(ro))
            plan = plan.subset(part.start // n, -(-part.stop // n)) if plan is not None else None
        return per_token_logps(
            model, ro.prompt_ids[p_rows], ro.prompt_mask[p_rows], ro.completion_ids[c_rows], ro.completion_mask[c_rows],
            self.temperature, hidden_layers=layers, num_generations=n, shared_prompt=True,
            compute_logps=compute_logps, prefixes=plan, prefix_store=prefix_store,
            overwrite_logits=self.overwrite_logits)

    def requests(self, terms: dict[str, LossTerm], layout: Layout, per_prompt: int, device) -> list[Request]:
        """The policy forwards this step runs: the terms' scored rows, and the step's own rows unless a term's rows
        include them (``own``: then that forward serves the step, and nothing runs twice)."""
        scored = []
        if self.needs.scored_rows:
            for name, term in terms.items():
                if term.needs().scored_rows and (r := term.scored_rows(layout, device)) is not None:
                    scored.append(Request(r.prompt_rows, r.completion_rows, r.num_generations, term=name, own=r.own,
                                          grad=r.grad, hidden=False))
        host = next((i for i, r in enumerate(scored) if r.grad and r.own is not None), None)
        if host is not None:
            r = scored.pop(host)
            return [Request(r.prompt_rows, r.completion_rows, r.num_generations, term=r.term, own=r.own), *scored]
        return [Request(None, None, per_prompt), *scored]

    def run_all(self, model: nn.Module, ro, requests: list[Request], clock: Callable[[], float],
                timings: dict[str, float]) -> list[tuple[Tensor, dict]]:
        """Every request's (log-probs, hidden states); a term's forward of its own is timed as
        ``<term>_scored_rows``."""
        outs = []
        for r in requests:
            t0 = clock()
            with torch.set_grad_enabled(r.grad and torch.is_grad_enabled()):
                outs.append(self.forward(model, ro, rows=r.rows(ro) if r.prompt_rows is not None else None,
                                         num_generations=r.num_generations, hidden=r.hidden))
            if r.term is not None and r.own is None:
                timings[f"{r.term}_scored_rows"] = clock() - t0
        return outs

    @staticmethod
    def assemble(requests: list[Request], outs: list[tuple[Tensor, dict]]) -> tuple[Tensor, dict, dict[str, Tensor]]:
        """The step's log-probs [B, T] and hidden states, and each term's scored log-probs, from the requests'
        outputs (the first request serves the step: its own rows, or a term's rows that include them)."""
        (logps, hidden), first = outs[0], requests[0]
        if first.own is not None:
            logps, hidden = logps[first.own], {layer: h[first.own] for layer, h in hidden.items()}
        scored = {r.term: o[0] for r, o in zip(requests, outs, strict=True) if r.term is not None}
        return logps, hidden, scored

    def policy(self, policy: nn.Module, ro, terms: dict[str, LossTerm], layout: Layout, per_prompt: int,
               clock: Callable[[], float], timings: dict[str, float]) -> tuple[Tensor, dict, dict[str, Tensor]]:
        """The step's log-probs [B, T] and hidden states, and each term's scored rows (one forward each)."""
        requests = self.requests(terms, layout, per_prompt, ro.completion_ids.device)
        return self.assemble(requests, self.run_all(policy, ro, requests, clock, timings))

    @torch.no_grad()
    def reference(self, reference: nn.Module | None, policy: nn.Module, ro, per_prompt: int) -> tuple[Any, dict]:
        """One reference forward serves every term's reference log-probs and hidden states. The reference is frozen,
        so the KV cache of the prompts' shared openings is kept from step to step. Without a reference model (LoRA)
        the policy runs with its adapter disabled."""
        kwargs = dict(compute_logps=self.needs.reference_logps, prefix_store=self.reference_prefixes,
                      layers=self.needs.reference_hidden_layers, per_prompt=per_prompt)
        if reference is not None:
            return self.forward(reference, ro, **kwargs)
        with policy.disable_adapter():
            return self.forward(policy, ro, **kwargs)


def objective(terms, step, clock: Callable[[], float], timings: dict[str, float]) -> tuple[Tensor, dict[str, Any]]:
    """The weighted sum of the terms' losses on ``step``, and their metrics (``train/<term>/...``); each term's time
    goes to ``timings[<term>]``."""
    total = step.logps.new_zeros(())
    metrics: dict[str, Any] = {}
    for name, term in terms.items():
        t0 = clock()
        loss, term_metrics = term(step)
        timings[name] = clock() - t0
        total = total + term.weight * loss
        metrics[f"train/{name}/loss"] = loss.detach()
        metrics.update({f"train/{name}/{k}": v for k, v in term_metrics.items()})
    metrics["train/entropy"] = token_entropy(step.logps, step.eos_mask)
    return total, metrics


def token_entropy(logps: Tensor, mask: Tensor) -> Tensor:
    """Per-token entropy of the policy on the completion tokens, estimated as the mean of ``-log p`` of the sampled
    tokens (``logps`` are at the sampling temperature, so this is an unbiased estimate of the sampling distribution's
    entropy on a fresh rollout); detached."""
    m = mask.to(logps.dtype)
    return -(logps.detach() * m).sum() / m.sum().clamp(min=1)
