"""Per-token log-probs of completions under a model: one forward that shares each distinct prompt's KV cache over
its completions (:mod:`.prefix`), and a log-softmax that keeps one row of logits in memory at a time."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..models.compat import cache_argument, checkpoint_layers, layers_read_cache, read_only, unchecked
from .prefix import PrefixPlan, prefill_prompts


def per_token_logps(model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor,
                    completion_mask: Tensor, temperature: float = 1.0, hidden_layers: Sequence[int] = (),
                    num_generations: int = 1, shared_prompt: bool | None = None, compute_logps: bool = True,
                    prefixes: PrefixPlan | None = None, prefix_store: dict | None = None,
                    overwrite_logits: bool = True) -> tuple[Tensor | None, dict[int, Tensor]]:
    """Log-probs [B, T] (float32) of the completion tokens, logits divided by the sampling temperature (as TRL
    does), and ``{layer: hidden states [B, T, D] at the completion positions}`` for each of ``hidden_layers``
    (indices into the model's ``hidden_states``; one forward serves both). ``compute_logps=False`` skips the
    unembedding and the log-softmax (a reference forward that only feeds hidden states) and returns ``None``.

    Shared prompt: when each run of ``num_generations`` consecutive rows has the same prompt (as a rollout's groups
    do), each distinct prompt is run once, the openings that distinct prompts share once (``prefixes``, the
    rollout's plan; computed here from the rows when not given, which reads them on the host), and the prompt's KV
    cache is repeated G times before the completions run on top of it (:mod:`.prefix`). Gradients
    flow through the cache, so values and gradients equal the plain forward's, for much less prompt compute and
    activation memory. ``prefix_store`` keeps a frozen model's prefix cache from call to call. ``shared_prompt=True``
    asserts that layout (callers that built the rows know it: no comparison, no host-device sync); ``None`` compares
    the rows. Under activation checkpointing the prompts run unchecked and the checkpointed completions read their
    cache without extending it (:func:`~enigma_lightning.models.compat.checkpoint_layers`). Falls back to the plain forward
    when rows differ, when prompts are not left-padded, or when checkpointing cannot keep a cache (checkpointing
    other than transformers' layers, sliding-window attention).

    ``overwrite_logits``: the backward writes the logits' gradient into the logits' own memory (no second [B, T, V]
    buffer; :func:`selective_log_softmax`), so the graph takes one backward; ``False`` allows more (``retain_graph``).
    """
    g = num_generations
    layers = checkpoint_layers(model) if g > 1 else None  # None: the plain forward
    shared = layers is not None and (
        shared_prompt if shared_prompt is not None else _groups_share_prompt(prompt_ids, g))
    if shared and prompt_ids.size(0) % g:
        raise ValueError(f"shared_prompt: {prompt_ids.size(0)} rows are not groups of {g}")
    plan = prefixes if prefixes is not None or not shared else \
        PrefixPlan.from_prompts(prompt_ids[::g], prompt_mask[::g])
    t = completion_ids.size(1)
    want_hidden = bool(hidden_layers)
    head = None
    pre = None
    if shared and plan is not None:
        with unchecked(model):
            pre = prefill_prompts(model, prompt_ids[::g], prompt_mask[::g], plan, logits=compute_logps,
                                  store=prefix_store)
        if layers:
            if not read_only(pre.cache):  # a layer kind the config did not announce: checkpointing would drop it
                pre = None
    if pre is not None:
        pre.cache.batch_repeat_interleave(g)  # differentiable: gradients reach the prompt's keys and values
        positions = pre.lengths.repeat_interleave(g)[:, None] + torch.arange(t, device=completion_ids.device)
        with layers_read_cache(layers):
            out = model(input_ids=completion_ids, attention_mask=torch.cat([pre.mask.repeat_interleave(g, 0),
                                                                            completion_mask], dim=1),
                        position_ids=positions, use_cache=True, output_hidden_states=want_hidden,
                        logits_to_keep=t if compute_logps else 1, **{cache_argument(model): pre.cache})
        # the prompt's last position predicts completion token 0
        head = pre.last_logits.repeat_interleave(g, dim=0) if compute_logps else None
    else:
        out = model(input_ids=torch.cat([prompt_ids, completion_ids], dim=1),
                    attention_mask=torch.cat([prompt_mask, completion_mask], dim=1),
                    logits_to_keep=t + 1 if compute_logps else 1, output_hidden_states=want_hidden, use_cache=False)
    hidden = {layer: out.hidden_states[layer][:, -t:] for layer in hidden_layers} if want_hidden else {}
    if not compute_logps:
        return None, hidden
    # the logits are this forward's own (nothing else reads them): their memory can take their gradient
    return selective_log_softmax(out.logits, completion_ids, temperature, head=head,
                                 overwrite=overwrite_logits), hidden


def _groups_share_prompt(prompt_ids: Tensor, g: int) -> bool:
    b = prompt_ids.size(0)
    return b % g == 0 and torch.equal(prompt_ids, prompt_ids[::g].repeat_interleave(g, dim=0))


def selective_log_softmax(logits: Tensor, index: Tensor, temperature: float = 1.0, head: Tensor | None = None,
                          overwrite: bool = False) -> Tensor:
    """``log_softmax(logits / temperature)`` at ``index`` [B, T], in float32 (float64 for float64 logits), one row at
    a time.

    Position t of row b reads ``logits[b, t]``; with ``head`` [B, h, V] the first h positions read ``head`` and
    position t >= h reads ``logits[b, t - h]`` (the completion's first token is predicted by the prompt's last
    position). Positions of ``logits`` past T - h are ignored (their gradient is zero). Neither the scaled logits,
    their float32 copy nor the log-softmax is materialised for the whole batch: forward and backward work on one
    [T, V] row at a time (the backward recomputes the row's softmax from the saved logits and log-normaliser), so
    the extra memory is one row, whatever the vocabulary.

    ``overwrite``: the backward writes the gradient into ``logits`` and ``head`` themselves, row by row after reading
    each (the same values, without a second [B, T, V] buffer: on the embedded default that is the largest tensor of
    the step). Pass it only for logits that nothing reads after the backward; a second backward through the result
    (``retain_graph``) is refused with an error.
    """
    return _SelectiveLogSoftmax.apply(logits, index, float(temperature), head, overwrite)


def _segments(logits: Tensor, head: Tensor | None, index: Tensor, b: int):
    """Row b as (logits [n, V], their target ids [n], positions) pieces: the head's positions, then the rest."""
    t = index.size(1)
    h = 0 if head is None else head.size(1)
    if h:
        yield head[b], index[b, :h], slice(0, h)
    yield logits[b, : t - h], index[b, h:], slice(h, t)


class _SelectiveLogSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, index, temperature, head, overwrite):
        dtype = torch.promote_types(logits.dtype, torch.float32)
        out = torch.empty(index.shape, dtype=dtype, device=index.device)
        lse = torch.empty_like(out)
        for i in range(index.size(0)):
            for x, idx, pos in _segments(logits, head, index, i):
                x = x.to(dtype)
                x = x / temperature if temperature != 1.0 else x
                lse[i, pos] = torch.logsumexp(x, dim=-1)
                out[i, pos] = x.gather(-1, idx.unsqueeze(-1)).squeeze(-1) - lse[i, pos]
        ctx.save_for_backward(logits, index, lse, *(() if head is None else (head,)))
        ctx.temperature, ctx.overwrite = temperature, overwrite
        return out

    @staticmethod
    def backward(ctx, grad):
        if ctx.overwrite:
            if getattr(ctx, "overwritten", False):
                raise RuntimeError(
                    "a second backward through log-probs whose logits hold the first backward's gradient "
                    "(selective_log_softmax(overwrite=True)); compute them with per_token_logps(..., "
                    "overwrite_logits=False), or set EnigmaModule.forwards.overwrite_logits = False, to backward more than once")
            ctx.overwritten = True
        logits, index, lse, *rest = ctx.saved_tensors
        head = rest[0] if rest else None
        temperature = ctx.temperature
        t = index.size(1)
        h = 0 if head is None else head.size(1)
        # each row is read (into p, below) before its gradient is written, so the logits can take it
        buffer = (lambda x: x) if ctx.overwrite else torch.empty_like
        grad_logits = buffer(logits)
        grad_logits[:, t - h :].zero_()  # positions past the completion (the last, unused logits)
        grad_head = None if head is None else buffer(head)
        grads = (grad_logits,) if head is None else (grad_head, grad_logits)
        for i in range(index.size(0)):
            for (x, idx, pos), gbuf in zip(_segments(logits, head, index, i), grads, strict=True):
                out = gbuf[i, : pos.stop - pos.start]
                g = (grad[i, pos].to(lse.dtype) / temperature).unsqueeze(-1)  # [n, 1]
                # d/dx of (x_idx - logsumexp(x)) / T: (onehot - softmax(x / T)) / T, times the incoming gradient;
                # written in place into the gradient buffer when the logits are float32 (no temporary)
                p = out if out.dtype == lse.dtype else torch.empty(out.shape, dtype=lse.dtype, device=out.device)
                if temperature != 1.0 and x.dtype == p.dtype:
                    torch.div(x, temperature, out=p)
                else:
                    p.copy_(x)  # (upcast first, then scale: the forward's order)
                    if temperature != 1.0:
                        p.div_(temperature)
                p.sub_(lse[i, pos].unsqueeze(-1)).exp_().mul_(-g).scatter_add_(-1, idx.unsqueeze(-1), g)
                if p is not out:
                    out.copy_(p)
        return grad_logits, None, None, grad_head, None
