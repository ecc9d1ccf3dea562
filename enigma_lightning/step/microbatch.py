"""A GRPO step in micro-batches whose loss and gradients equal the one-batch step's, for every term.

``step.micro_batch_size`` bounds the rows of every policy forward and backward (TRL: ``per_device_train_batch_size``
with ``steps_per_generation``; verl: ``ppo_micro_batch_size_per_gpu``); the optimiser still steps once per rollout.

Gradient caching (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup",
arXiv 2101.06983): every term sees the whole step, so nothing about a term has to decompose over rows.

1. The policy's forwards run without gradient, in micro-batches; their outputs (log-probs, hidden states, scored
   rows) become leaf tensors.
2. Every term computes its loss on the whole step from those leaves, exactly as in the one-batch step (GRPO's
   normalisers, dapo's global token count, bnpo's whole-step token count (TRL's bnpo normalises per micro-batch),
   SAMI's K x K matrices, OT's Sinkhorn divergence over the whole cloud); one backward gives the gradient of the
   total with respect to the leaves (and to the terms' own parameters, directly).
3. Each micro-batch runs its forward again, with gradient, and backpropagates its rows' share:
   ``sum(logps * dL/dlogps) + sum(hidden * dL/dhidden)``. By the chain rule the parameters' gradient is the
   one-batch step's (up to float rounding; dropout must be off, as in the models we load).

The cost is one extra forward without gradient over the step (the first phase), about a third of a forward and
backward; ``benchmarks/memory.py`` prints it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .forwards import Request, StepForwards


def _leaf(t: Tensor | None, grad: bool) -> Tensor | None:
    return None if t is None else t.detach().requires_grad_(grad)


def cached_forwards(forwards: StepForwards, policy, ro, requests: list[Request], clock: Callable[[], float],
                    timings: dict[str, float]) -> list[tuple[Tensor, dict]]:
    """Phase 1: every request's outputs without gradient (in micro-batches), as leaves for the terms."""
    with torch.no_grad():
        outs = forwards.run_all(policy, ro, requests, clock, timings)
    return [(_leaf(lp, r.grad), {k: _leaf(h, r.grad) for k, h in hid.items()})
            for r, (lp, hid) in zip(requests, outs, strict=True)]


def replay(forwards: StepForwards, policy, ro, requests: list[Request], leaves: list[tuple[Tensor, dict]],
           backward: Callable[[Tensor], Any]) -> int:
    """Phase 3: each micro-batch's forward with gradient, backpropagating the leaves' cached gradients. Returns the
    number of micro-batches run."""
    runs = 0
    for r, (lp, hid) in zip(requests, leaves, strict=True):
        if not r.grad:
            continue
        grads = {k: h.grad for k, h in hid.items() if h.grad is not None}
        g_logps = lp.grad if lp is not None else None
        if g_logps is None and not grads:
            continue
        layers = tuple(grads) if r.hidden else ()
        for part in forwards.chunks(r.size(ro), r.num_generations):
            logps, hidden = forwards.run(policy, ro, r, part, layers, compute_logps=g_logps is not None)
            surrogate = sum((h * grads[k][part]).sum() for k, h in hidden.items())
            if g_logps is not None:
                surrogate = surrogate + (logps * g_logps[part]).sum()
            backward(surrogate)
            runs += 1
    return runs
