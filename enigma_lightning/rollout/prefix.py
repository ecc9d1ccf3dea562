"""Shared prompt prefixes: each distinct prompt of a batch runs once, and prompts that open with the same tokens run
that opening once.

A rollout's prompt rows repeat in two ways. Each distinct prompt carries G completions (G / K under SAMI), and every
question of one principle variant opens with the same system message and worked example: on the embedded default 176
of ~200 prompt tokens. :func:`prefill_prompts` runs each shared opening (a *prefix*) once, each distinct prompt's remaining
tokens (its *suffix*) once on top of its prefix's KV cache, and returns the cache, one row per distinct prompt, for the
caller to repeat over completions. Gradients flow through the cache into both forwards, so values and gradients
equal those of the plain forward over every (prompt, completion) row.

Prompt columns of distinct prompt u (L = longest prefix, S = longest suffix of the batch)::

    [pad | prefix of u's group] [pad | suffix of u]
    <----------- L -----------> <------- S ------->

The mask is 1 on real tokens and position ids count real tokens only (as ``generate`` counts them), so u's prompt
sits at positions 0 .. n_u - 1 and its completion starts at n_u. The plain left-padded forward puts the same tokens at
the same distances from each other; with rotary position embeddings attention depends on those distances alone, so
the two agree up to float rounding.

The plan (:class:`PrefixPlan`) is host data computed once from the tokenizer's output, so a training step that uses
it reads nothing back from the device.

Under activation checkpointing transformers drops the cache inside checkpointed layers (a layer's replay in the
backward would extend it a second time). :func:`~enigma_lightning.models.compat.checkpoint_layers` finds those layers; the prompts then run with
checkpointing off for their few rows (:func:`~enigma_lightning.models.compat.unchecked`), and the completions,
checkpointed, read the prompts' cache through :func:`~enigma_lightning.models.compat.read_only` layers that never
extend it (:func:`~enigma_lightning.models.compat.layers_read_cache`): the replay reads what the first run read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..models import compat

MIN_PREFIX = 8  # shorter shared openings are not worth a forward of their own


@dataclass(frozen=True)
class PrefixPlan:
    """Which distinct prompts share which opening tokens."""

    lengths: tuple[int, ...]  # real tokens of each distinct prompt
    groups: tuple[tuple[int, ...], ...] = ()  # indices of the distinct prompts that share a prefix (two or more)
    prefixes: tuple[tuple[int, ...], ...] = ()  # the token ids each group shares
    row_group: tuple[int, ...] = field(init=False)  # group of each distinct prompt (-1: none)

    def __post_init__(self):
        rg = [-1] * len(self.lengths)
        for gi, members in enumerate(self.groups):
            for u in members:
                rg[u] = gi
        object.__setattr__(self, "row_group", tuple(rg))

    def __repr__(self) -> str:
        return f"PrefixPlan({len(self.lengths)} prompts, groups {list(self.groups)} sharing " \
               f"{[len(x) for x in self.prefixes]} tokens)"

    @property
    def row_prefix_lengths(self) -> list[int]:
        return [len(self.prefixes[gi]) if gi >= 0 else 0 for gi in self.row_group]

    def subset(self, start: int, stop: int) -> PrefixPlan:
        """The plan of distinct prompts ``start .. stop - 1``, numbered from 0 (a micro-batch's prompts); a group left
        with one member runs its prompt whole."""
        groups, prefixes = [], []
        for members, prefix in zip(self.groups, self.prefixes, strict=True):
            kept = tuple(u - start for u in members if start <= u < stop)
            if len(kept) >= 2:
                groups.append(kept)
                prefixes.append(prefix)
        return PrefixPlan(self.lengths[start:stop], tuple(groups), tuple(prefixes))

    def ungrouped(self) -> PrefixPlan:
        """The same prompts, each run whole (every rank runs the same forwards: FSDP)."""
        return PrefixPlan(self.lengths)

    @classmethod
    def from_prompts(cls, ids: Tensor, mask: Tensor, min_prefix: int = MIN_PREFIX) -> PrefixPlan | None:
        """The plan for left-padded distinct prompts ``ids``/``mask`` [U, P] (read on the host; pass CPU tensors to
        avoid a device sync). None when a row is not left-padded (real tokens must end the row).

        Prompts are sorted, and consecutive runs of them are grouped so that the tokens run in all (each group's
        prefix once, plus every suffix) are fewest (dynamic programming over the sorted order; the prefix a run
        shares is the smallest common prefix of neighbours, stopped one token before its shortest member ends so
        every prompt keeps a suffix)."""
        ids, mask = ids.cpu(), mask.cpu().bool()
        n = mask.sum(1).tolist()
        p = ids.size(1)
        if any(not bool(m[p - k:].all()) for m, k in zip(mask, n, strict=True)):
            return None
        rows = [r[p - k:].tolist() for r, k in zip(ids, n, strict=True)]
        order = sorted(range(len(rows)), key=rows.__getitem__)
        lcp = [_common(rows[a], rows[b]) for a, b in zip(order, order[1:], strict=False)]
        # best[j]: fewest tokens for order[:j]; run (i, j) = order[i:j] as one group (or one prompt when j = i + 1)
        best, cut = [0] + [None] * len(order), [0] * (len(order) + 1)
        for j in range(1, len(order) + 1):
            shared, shortest, size = 10**9, 10**9, 0
            for i in range(j - 1, -1, -1):
                shortest, size = min(shortest, n[order[i]]), size + n[order[i]]
                if i < j - 1:
                    shared = min(shared, lcp[i])
                k = min(shared, shortest - 1) if i < j - 1 else 0
                cost = size - (j - i - 1) * k if k >= min_prefix else size
                if best[j] is None or best[i] + cost < best[j]:
                    best[j], cut[j] = best[i] + cost, i
        groups, prefixes, j = [], [], len(order)
        while j > 0:
            i = cut[j]
            members = order[i:j]
            k = min(min(lcp[i : j - 1], default=0), min(n[u] for u in members) - 1)
            if len(members) > 1 and k >= min_prefix:
                groups.append(tuple(sorted(members)))
                prefixes.append(tuple(rows[members[0]][:k]))
            j = i
        return cls(tuple(n), tuple(reversed(groups)), tuple(reversed(prefixes)))


def _common(a: list[int], b: list[int]) -> int:
    k = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        k += 1
    return k


@dataclass
class Prefill:
    """The prompt part of a batch of distinct prompts, run."""

    cache: Any  # the model's KV cache of the prompt columns, one row per distinct prompt (None: nothing run)
    ids: Tensor  # [U, L + S] token ids in the shared-prefix layout
    mask: Tensor  # [U, L + S]
    lengths: Tensor  # [U] real prompt tokens: the position id of the first completion token
    last_logits: Tensor | None  # [U, 1, V] logits at each prompt's last token


def prefill_prompts(model: nn.Module, ids: Tensor, mask: Tensor, plan: PrefixPlan, *, leave_last: bool = False,
            logits: bool = True, store: dict | None = None) -> Prefill:
    """Run the distinct left-padded prompts ``ids``/``mask`` [U, P] as ``plan`` says: one forward over the groups'
    prefixes, one over every prompt's suffix on top of its prefix's cache.

    ``leave_last``: the cache stops before each prompt's last token (``generate`` runs that token itself).
    ``logits``: return the logits at each prompt's last token (they predict the first completion token).
    ``store``: a dict that keeps the prefixes' cache from call to call, for a frozen model (the reference): its
    prefixes are then run once per run, not once per step."""
    dev, (u, p) = ids.device, ids.shape
    row_prefix = plan.row_prefix_lengths
    big_l = max(row_prefix, default=0)
    suffix = [a - b for a, b in zip(plan.lengths, row_prefix, strict=True)]
    big_s = max(suffix)
    cache, pre_ids, pre_mask = None, ids.new_zeros(u, 0), mask.new_zeros(u, 0)
    if big_l:
        tok = to_device([[0] * (big_l - len(x)) + list(x) for x in plan.prefixes], dev, ids.dtype)
        gmask = to_device([[0] * (big_l - len(x)) + [1] * len(x) for x in plan.prefixes], dev, mask.dtype)
        if store is not None and plan.prefixes in store:
            cache = compat.fork_cache(store[plan.prefixes])
        else:
            gpos = (gmask.cumsum(1) - 1).clamp(min=0)
            cache = compat.output_cache(model(input_ids=tok, attention_mask=gmask, position_ids=gpos, use_cache=True,
                                       logits_to_keep=1))
            if store is not None:
                if len(store) >= 8:
                    store.pop(next(iter(store)))
                store[plan.prefixes] = compat.fork_cache(cache)
        rows = [max(gi, 0) for gi in plan.row_group]  # rows without a group: masked out
        sel = to_device(rows, dev)
        compat.select_rows(cache, rows, sel)
        has = to_device([gi >= 0 for gi in plan.row_group], dev, mask.dtype)
        pre_ids, pre_mask = tok[sel], gmask[sel] * has[:, None]
    offset = torch.arange(big_s, device=dev)[None] - (big_s - to_device(suffix, dev))[:, None]  # <0: pad
    sfx_mask = (offset >= 0).to(mask.dtype)
    sfx_pos = (to_device(row_prefix, dev)[:, None] + offset).clamp(min=0)
    tree_ids, tree_mask = torch.cat([pre_ids, ids[:, p - big_s :]], 1), torch.cat([pre_mask, sfx_mask], 1)
    run = big_s - 1 if leave_last else big_s
    last = None
    if run:
        out = model(input_ids=tree_ids[:, big_l : big_l + run], attention_mask=tree_mask[:, : big_l + run],
                    position_ids=sfx_pos[:, :run], use_cache=True, logits_to_keep=1, **{compat.cache_argument(model): cache})
        cache = compat.output_cache(out)
        last = out.logits[:, -1:] if logits and not leave_last else None
    return Prefill(cache, tree_ids, tree_mask, to_device(plan.lengths, dev), last)


def to_device(data, device: torch.device, dtype: torch.dtype = torch.long) -> Tensor:
    """Host data as a tensor on ``device``, copied without waiting: a blocking copy to a GPU would first wait for
    all the work queued on it (pageable memory is staged at once, so the list may be dropped after the call)."""
    return torch.tensor(data, dtype=dtype).to(device, non_blocking=True)


