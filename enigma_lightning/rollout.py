"""Rollout: G sampled completions per prompt, masks up to the first EOS, truncation flags, per-token log-probs.

Both generation and the training forwards run each distinct prompt once, and the opening tokens that prompts share
once (:mod:`enigma_lightning.prefix`), then repeat the prompt's KV cache over its completions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .prefix import (
    PrefixPlan,
    cache_argument,
    checkpoint_layers,
    layers_read_cache,
    prefill_prompts,
    unchecked,
)


@dataclass
class SamplingConfig:
    """Sampling settings of the rollout (``conf/rollout/*.yaml``)."""

    max_new_tokens: int = 96
    min_new_tokens: int = 0  # > 0 suppresses EOS before this many tokens (fixed-length rollouts for benchmarks)
    temperature: float = 0.9
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    max_prompt_length: int | None = 1024  # longer prompts are cut from the left (the question stays)
    seed_per_prompt: bool = False  # each completion's randomness from (seed, step, prompt, index): see row_seeds
    reserve_cache: bool = True  # KV cache written in place while sampling, not grown by torch.cat (see kvcache)
    share_prompts: bool = True  # prefill each distinct prompt (and shared opening) once, repeat its cache over G


@dataclass
class Rollout:
    prompt_ids: Tensor  # [B, P] left padded; B = prompts * G, each prompt's G completions consecutive
    prompt_mask: Tensor  # [B, P]
    completion_ids: Tensor  # [B, T] right padded with pad_token_id after the first EOS
    completion_mask: Tensor  # [B, T] 1 up to and including the first EOS
    truncated: Tensor  # [B] bool: no EOS within max_new_tokens
    completions: list[str]  # decoded completions, assistant prefill prepended
    prefixes: PrefixPlan | None = None  # shared openings of the distinct prompts (rows[::G]); host data

    @property
    def lengths(self) -> Tensor:
        return self.completion_mask.sum(1)


def eos_token_ids(tokenizer, model: nn.Module) -> list[int]:
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list | tuple) else [gen_eos])
    return sorted(i for i in ids if i is not None)


def completion_mask_from_eos(completion_ids: Tensor, eos_ids: list[int]) -> tuple[Tensor, Tensor]:
    """Mask [B, T] that is 1 up to and including the first EOS token, and truncated [B] (no EOS at all)."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))
    has_eos = is_eos.any(dim=1)
    first = torch.where(has_eos, is_eos.int().argmax(dim=1), torch.full_like(has_eos, completion_ids.size(1), dtype=torch.long))
    positions = torch.arange(completion_ids.size(1), device=completion_ids.device).expand_as(completion_ids)
    return (positions <= first.unsqueeze(1)).long(), ~has_eos


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompts: list[str], num_generations: int, sampling: SamplingConfig,
             prefill: str = "", greedy: bool = False, seeds: list[int] | None = None,
             synced_gpus: bool = False) -> Rollout:
    """Sample ``num_generations`` completions for each prompt (greedy: one per prompt, ``num_generations`` ignored).

    ``seeds`` (one per completion, see :func:`row_seeds`) makes each completion a function of its own seed, not of
    the batch it is generated in: a run on N processes samples what a one-process run samples. ``synced_gpus``
    keeps sharded (FSDP) ranks stepping together until every rank is done."""
    device = next(model.parameters()).device
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False,
                    truncation=sampling.max_prompt_length is not None, max_length=sampling.max_prompt_length)
    g = 1 if greedy else num_generations
    plan = PrefixPlan.from_prompts(enc["input_ids"], enc["attention_mask"])  # on the host, before the copy
    ids, am = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    prompt_ids, prompt_mask = ids.repeat_interleave(g, dim=0), am.repeat_interleave(g, dim=0)
    eos = eos_token_ids(tokenizer, model)
    kwargs = dict(max_new_tokens=sampling.max_new_tokens, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos,
                  use_cache=True, synced_gpus=synced_gpus)
    if sampling.min_new_tokens:
        kwargs["min_new_tokens"] = sampling.min_new_tokens
    if greedy:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    else:  # transformers' warpers, then one exact draw per row (InverseCdfSampler) that greedy decoding picks up
        from transformers import (
            LogitsProcessorList,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        procs = [TemperatureLogitsWarper(sampling.temperature)]
        procs += [TopKLogitsWarper(sampling.top_k)] if sampling.top_k else []
        procs += [TopPLogitsWarper(sampling.top_p)] if sampling.top_p < 1.0 else []
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None,
                      repetition_penalty=sampling.repetition_penalty,
                      logits_processor=LogitsProcessorList([*procs, InverseCdfSampler(seeds)]))
    # Prompts run once each, shared openings once (the cache is then repeated over the G completions): with
    # ``share_prompts`` (the default), and not under FSDP (ranks would run different numbers of forwards), with a
    # repetition penalty (it reads the padded ids) or with a cache the model's generation config asks for.
    named_cache = getattr(model.generation_config, "cache_implementation", None) is not None
    shared = sampling.share_prompts and plan is not None and (g > 1 or bool(plan.groups)) and not synced_gpus \
        and sampling.repetition_penalty == 1.0 and not named_cache
    cache_key = cache_argument(model)  # the keyword generate takes the cache under
    was_training = model.training
    model.eval()
    try:
        inputs, attention = prompt_ids, prompt_mask
        if shared:
            pre = prefill_prompts(model, ids, am, plan, leave_last=True, logits=False)
            inputs, attention = pre.ids.repeat_interleave(g, dim=0), pre.mask.repeat_interleave(g, dim=0)
            if pre.cache is not None:
                pre.cache.batch_repeat_interleave(g)
                kwargs[cache_key] = pre.cache
        if sampling.reserve_cache and not named_cache:
            _reserve_cache(model, kwargs, cache_key, sampling.max_new_tokens)
        out = model.generate(input_ids=inputs, attention_mask=attention, **kwargs)
    finally:
        model.train(was_training)
    completion_ids = out[:, inputs.size(1):]
    mask, truncated = completion_mask_from_eos(completion_ids, eos)
    completion_ids = completion_ids.masked_fill(mask == 0, tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    return Rollout(prompt_ids, prompt_mask, completion_ids, mask, truncated, [prefill + t for t in texts], plan)


def _reserve_cache(model: nn.Module, kwargs: dict, name: str, tokens: int) -> None:
    """Generate into a KV cache that is written in place (:mod:`enigma_lightning.kvcache`): the prefilled one, or,
    when there is none, the cache ``generate`` would build itself (callers leave out models whose generation config
    names a cache). ``name``: the keyword ``generate`` takes the cache under (:func:`~.prefix.cache_argument`)."""
    from transformers import DynamicCache

    from .kvcache import reserve

    cache = kwargs.get(name)
    if cache is None:
        if getattr(model.config, "is_encoder_decoder", False) \
                or not getattr(model, "_supports_default_dynamic_cache", lambda: False)():
            return
        cache = kwargs[name] = DynamicCache(config=model.config.get_text_config(decoder=True))
    if isinstance(cache, DynamicCache):
        reserve(cache, tokens)


def row_seeds(seed: int, step: int, prompts: list[str], num_generations: int) -> list[int]:
    """One seed per completion from (seed, step, prompt text, repeat of that text in the batch, index in the group):
    the same completion gets the same seed whichever rank or batch position its prompt lands on."""
    import hashlib

    seen: dict[str, int] = {}
    out = []
    for p in prompts:
        n = seen[p] = seen.get(p, -1) + 1
        for j in range(num_generations):
            h = hashlib.blake2b(f"{seed}|{step}|{n}|{j}|{p}".encode(), digest_size=8).digest()
            out.append(int.from_bytes(h, "little") & (2**63 - 1))
    return out


class InverseCdfSampler:
    """Logits processor, last in the list, for greedy decoding to pick up: draws each row's next token from
    softmax(scores) and returns scores that are 0 at that token and -inf elsewhere.

    The draw inverts the row's cumulative distribution: one uniform number per row, a float64 running sum over the
    vocabulary and a binary search. It samples the distribution ``torch.multinomial`` samples (tokens the warpers
    filtered to -inf have probability 0), which instead draws an exponential variate for every vocabulary entry: on
    a 2-core CPU, 16 rows of a 49k vocabulary, 4 ms against 23 ms a decoding step.

    ``seeds`` (one per row, see :func:`row_seeds`): row i's uniform numbers come from its own generator, so its
    completion depends on its seed and the logits only, not on the batch it is sampled in. The generators live on
    the scores' device (made at the first call); a device's generator is its own stream (CUDA's Philox, the CPU's
    Mersenne twister), so a completion is a function of its seed on a given kind of device. Without seeds the
    numbers come from torch's global stream on that device."""

    def __init__(self, seeds: list[int] | None = None):
        self.seeds = None if seeds is None else list(seeds)
        self.generators: list[torch.Generator] | None = None

    def uniform(self, rows: int, device: torch.device) -> Tensor:
        """[rows, 1] float64 numbers in [0, 1)."""
        if self.seeds is None:
            return torch.rand(rows, 1, dtype=torch.float64, device=device)
        if len(self.seeds) != rows:
            raise ValueError(f"{len(self.seeds)} seeds for {rows} completions")
        if self.generators is None:
            self.generators = [torch.Generator(device=device).manual_seed(s) for s in self.seeds]
        return torch.cat([torch.rand(1, generator=g, dtype=torch.float64, device=device) for g in self.generators])[
            :, None]

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        cdf = torch.softmax(scores.float(), dim=-1).to(torch.float64).cumsum(dim=-1)
        total = cdf[:, -1:]
        u = self.uniform(scores.size(0), scores.device) * total
        u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))  # rounding must not reach the end
        token = torch.searchsorted(cdf, u, right=True)  # the first entry above u: a token of probability > 0
        return torch.full_like(scores, float("-inf")).scatter_(1, token, 0.0)


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
    cache is repeated G times before the completions run on top of it (:mod:`enigma_lightning.prefix`). Gradients
    flow through the cache, so values and gradients equal the plain forward's, for much less prompt compute and
    activation memory. ``prefix_store`` keeps a frozen model's prefix cache from call to call. ``shared_prompt=True``
    asserts that layout (callers that built the rows know it: no comparison, no host-device sync); ``None`` compares
    the rows. Under activation checkpointing the prompts run unchecked and the checkpointed completions read their
    cache without extending it (:func:`~enigma_lightning.prefix.checkpoint_layers`). Falls back to the plain forward
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
            from .kvcache import read_only

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


def checkpointing(model: nn.Module) -> bool:
    """Whether activation (gradient) checkpointing is on (transformers then drops the KV cache in training)."""
    # newer transformers name the flag is_activation_checkpointing (the old name warns); a peft wrapper forwards
    # either to its base model
    if hasattr(model, "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))


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
                    "overwrite_logits=False), or set EnigmaModule.overwrite_logits = False, to backward more than once")
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
