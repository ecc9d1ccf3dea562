"""The ``hf`` rollout engine: transformers' ``generate`` on the policy itself, in the training process.

Each distinct prompt is prefilled once and the opening tokens that prompts share once (:mod:`.prefix`), then the
prompt's KV cache is repeated over its G completions; the cache is written in place while sampling
(:func:`~enigma_lightning.models.compat.reserve`) and each token is drawn by :class:`~.sampling.InverseCdfSampler`."""

from __future__ import annotations

import torch
from torch import nn

from ..models import compat
from .batch import Rollout, completion_mask_from_eos, eos_token_ids
from .prefix import PrefixPlan, prefill_prompts
from .sampling import InverseCdfSampler, SamplingConfig


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompts: list[str], num_generations: int, sampling: SamplingConfig,
             prefill: str = "", greedy: bool = False, seeds: list[int] | None = None,
             synced_gpus: bool = False) -> Rollout:
    """Sample ``num_generations`` completions for each prompt (greedy: one per prompt, ``num_generations`` ignored).

    ``seeds`` (one per completion, see :func:`row_seeds`) makes each completion a function of its own seed, not of
    the batch it is generated in: a run on N processes samples what a one-process run samples. ``synced_gpus``
    keeps sharded (FSDP) ranks stepping together until every rank is done."""
    device = next(model.parameters()).device
    enc = encode_prompts(tokenizer, prompts, sampling)
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
    cache_key = compat.cache_argument(model)  # the keyword generate takes the cache under
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


class HFEngine:
    """``rollout/engine=hf``: :func:`generate` on the policy itself (no weights to sync, no settings)."""

    name = "hf"
    last_sync_seconds = 0.0

    def sync(self, model: nn.Module, tokenizer, sampling: SamplingConfig, version: int) -> float:
        return 0.0

    def generate(self, model: nn.Module, tokenizer, prompts: list[str], num_generations: int,
                 sampling: SamplingConfig, prefill: str = "", greedy: bool = False, seeds: list[int] | None = None,
                 synced_gpus: bool = False, version: int = 0) -> Rollout:
        return generate(model, tokenizer, prompts, num_generations, sampling, prefill=prefill, greedy=greedy,
                        seeds=seeds, synced_gpus=synced_gpus)

    def close(self) -> None:
        pass


def encode_prompts(tokenizer, prompts: list[str], sampling: SamplingConfig):
    """Tokenise prompts (padded). A prompt over ``sampling.max_prompt_length`` tokens is cut from the left
    (``long_prompts=left``: its end, the chat template's assistant header and the prefill, stays) or refused
    (``long_prompts=error``)."""
    limit = sampling.max_prompt_length
    if limit is not None:
        lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
        over = [(i, n) for i, n in enumerate(lengths) if n > limit]
        if over and sampling.long_prompts == "error":
            from ..errors import DataError

            i, n = over[0]
            raise DataError(f"{len(over)} prompt(s) are longer than rollout.max_prompt_length={limit} tokens (the "
                            f"first has {n}: ...{prompts[i][-120:]!r}). Raise rollout.max_prompt_length={max(lengths)}, "
                            "shorten the questions, or set rollout.long_prompts=left to cut their start")
        if over:
            import logging

            logging.getLogger(__name__).warning(
                "%d prompt(s) over rollout.max_prompt_length=%d tokens (longest %d) were cut from the left",
                len(over), limit, max(n for _, n in over))
    side = getattr(tokenizer, "truncation_side", "right")
    tokenizer.truncation_side = "left"
    try:
        return tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False,
                         truncation=limit is not None, max_length=limit)
    finally:
        tokenizer.truncation_side = side


def _reserve_cache(model: nn.Module, kwargs: dict, name: str, tokens: int) -> None:
    """Generate into a KV cache that is written in place (:func:`~enigma_lightning.models.compat.reserve`): the
    prefilled one, or, when there is none, the cache ``generate`` would build itself (callers leave out models whose
    generation config names a cache). ``name``: the keyword ``generate`` takes the cache under."""
    cache = kwargs.get(name)
    if cache is None:
        cache = compat.default_cache(model)
        if cache is None:
            return
        kwargs[name] = cache
    compat.reserve(cache, tokens)
