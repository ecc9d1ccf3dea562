"""The forwards of one training step, computed once for the union of what the selected terms need.

:class:`StepForwards` runs the policy (log-probs of the rollout's own rows, the hidden states the terms read, and the
extra rows terms declare as :class:`~enigma_lightning.losses.base.ScoredRows`) and the frozen reference (log-probs
and hidden states, only what some term needs). It never names a term.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..losses.base import Layout, LossTerm, Needs, ScoredRows
from ..rollout.logprobs import per_token_logps


class StepForwards:
    """Policy and reference forwards over a rollout's rows (the module owns the models; this owns the plan)."""

    def __init__(self, needs: Needs, temperature: float):
        self.needs, self.temperature = needs, temperature
        self.overwrite_logits = True  # see EnigmaModule.overwrite_logits
        self.sharded = False  # FSDP: every prompt runs whole (every rank runs the same forwards)
        self.reference_prefixes: dict = {}  # the frozen reference's KV cache of shared prompt openings

    def _prefixes(self, ro):
        return ro.prefixes.ungrouped() if self.sharded and ro.prefixes is not None else ro.prefixes

    def forward(self, model: nn.Module, ro, rows: tuple[Tensor, Tensor] | None = None,
                num_generations: int | None = None, compute_logps: bool = True, prefix_store: dict | None = None,
                hidden: bool = True, layers: tuple[int, ...] | None = None, per_prompt: int = 1):
        """Completion log-probs (None when not ``compute_logps``) and {layer: completion-token hidden states
        [B, T, D]} for ``layers`` (default: the layers the policy's terms read; none when not ``hidden``). ``rows``
        optionally gives (prompt rows, completion rows) to pair; by construction each prompt row repeats
        ``num_generations`` times in a row and the distinct prompts are the rollout's, in its order (no check, no
        device sync)."""
        p_rows, c_rows = rows if rows is not None else (slice(None), slice(None))
        layers = self.needs.hidden_layers if layers is None else layers
        return per_token_logps(
            model, ro.prompt_ids[p_rows], ro.prompt_mask[p_rows], ro.completion_ids[c_rows], ro.completion_mask[c_rows],
            self.temperature, hidden_layers=layers if hidden else (),
            num_generations=num_generations or per_prompt, shared_prompt=True, compute_logps=compute_logps,
            prefixes=self._prefixes(ro), prefix_store=prefix_store, overwrite_logits=self.overwrite_logits)

    def policy(self, policy: nn.Module, ro, terms: dict[str, LossTerm], layout: Layout, per_prompt: int,
               clock: Callable[[], float], timings: dict[str, float]) -> tuple[Tensor, dict, dict[str, Tensor]]:
        """The step's log-probs [B, T] and hidden states, and each term's scored rows. A term's rows that include
        the rollout's own pairs (``own``) run in the step's forward, which then serves the step from them; other
        requests run a forward each (timed as ``<term>_scored_rows``)."""
        requests: dict[str, ScoredRows] = {}
        if self.needs.scored_rows:
            for name, term in terms.items():
                if term.needs().scored_rows and (r := term.scored_rows(layout, ro.completion_ids.device)) is not None:
                    requests[name] = r
        host = next((n for n, r in requests.items() if r.grad and r.own is not None), None)
        scored: dict[str, Tensor] = {}
        if host is not None:
            r = requests.pop(host)
            all_logps, all_hidden = self.forward(policy, ro, rows=(r.prompt_rows, r.completion_rows),
                                                 num_generations=r.num_generations)
            logps, hidden = all_logps[r.own], {layer: h[r.own] for layer, h in all_hidden.items()}
            scored[host] = all_logps
        else:
            logps, hidden = self.forward(policy, ro, per_prompt=per_prompt)
        for name, r in requests.items():
            t0 = clock()
            with torch.set_grad_enabled(r.grad and torch.is_grad_enabled()):
                scored[name], _ = self.forward(policy, ro, rows=(r.prompt_rows, r.completion_rows),
                                               num_generations=r.num_generations, hidden=False)
            timings[f"{name}_scored_rows"] = clock() - t0
        return logps, hidden, scored

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
