"""Rollout: G sampled completions per prompt, masks up to the first EOS, truncation flags, per-token log-probs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


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


@dataclass
class Rollout:
    prompt_ids: Tensor  # [B, P] left padded; B = prompts * G, each prompt's G completions consecutive
    prompt_mask: Tensor  # [B, P]
    completion_ids: Tensor  # [B, T] right padded with pad_token_id after the first EOS
    completion_mask: Tensor  # [B, T] 1 up to and including the first EOS
    truncated: Tensor  # [B] bool: no EOS within max_new_tokens
    completions: list[str]  # decoded completions, assistant prefill prepended

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
    prompt_ids = enc["input_ids"].to(device).repeat_interleave(g, dim=0)
    prompt_mask = enc["attention_mask"].to(device).repeat_interleave(g, dim=0)
    eos = eos_token_ids(tokenizer, model)
    kwargs = dict(max_new_tokens=sampling.max_new_tokens, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos,
                  use_cache=True, synced_gpus=synced_gpus)
    if sampling.min_new_tokens:
        kwargs["min_new_tokens"] = sampling.min_new_tokens
    if greedy:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    elif seeds is not None:  # exact sampling by the Gumbel-max trick, with one random stream per completion
        from transformers import (
            LogitsProcessorList,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        if len(seeds) != prompt_ids.size(0):
            raise ValueError(f"{len(seeds)} seeds for {prompt_ids.size(0)} completions")
        procs = [TemperatureLogitsWarper(sampling.temperature)]
        procs += [TopKLogitsWarper(sampling.top_k)] if sampling.top_k else []
        procs += [TopPLogitsWarper(sampling.top_p)] if sampling.top_p < 1.0 else []
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None,
                      repetition_penalty=sampling.repetition_penalty,
                      logits_processor=LogitsProcessorList([*procs, PerRowGumbel(seeds)]))
    else:
        kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                      repetition_penalty=sampling.repetition_penalty)
    was_training = model.training
    model.eval()
    try:
        out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, **kwargs)
    finally:
        model.train(was_training)
    completion_ids = out[:, prompt_ids.size(1):]
    mask, truncated = completion_mask_from_eos(completion_ids, eos)
    completion_ids = completion_ids.masked_fill(mask == 0, tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    return Rollout(prompt_ids, prompt_mask, completion_ids, mask, truncated, [prefill + t for t in texts])


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


class PerRowGumbel:
    """Logits processor: adds Gumbel noise from one generator per row, so argmax samples softmax(scores) exactly
    (filtered tokens stay at -inf) and row i's draws depend on its seed and position only."""

    def __init__(self, seeds: list[int]):
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        v = scores.size(-1)
        u = torch.stack([torch.rand(v, generator=g) for g in self.generators]).to(scores.device)
        gumbel = -torch.log(-torch.log(u.clamp(min=1e-20, max=1 - 1e-7)))
        return scores.float() + gumbel


def per_token_logps(model: nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor,
                    completion_mask: Tensor, temperature: float = 1.0, output_hidden_states: bool = False,
                    num_generations: int = 1) -> tuple[Tensor, tuple[Tensor, ...] | None]:
    """Log-probs [B, T] of the completion tokens (logits divided by the sampling temperature, as TRL does), and the
    hidden states [B, P + T, D] of all layers when asked (one forward serves both).

    Shared prompt: when each run of ``num_generations`` consecutive rows has the same prompt (as a rollout's groups
    do), the prompt is run once per group and its KV cache repeated G times before the completions are run on top
    of it. Gradients flow through the cache, so values and gradients equal the plain forward's, for about G times
    less prompt compute and activation memory. Falls back to the plain forward when rows differ or under gradient
    checkpointing (which disables the cache).
    """
    if num_generations > 1 and _groups_share_prompt(prompt_ids, num_generations) and not checkpointing(model):
        return _shared_prompt_logps(model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature,
                                    output_hidden_states, num_generations)
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    t = completion_ids.size(1)
    out = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=t + 1,
                output_hidden_states=output_hidden_states, use_cache=False)
    logits = out.logits[:, :-1, :].float() / temperature  # [B, T, V]
    logps = selective_log_softmax(logits, completion_ids)
    return logps, (out.hidden_states if output_hidden_states else None)


def checkpointing(model: nn.Module) -> bool:
    """Whether activation (gradient) checkpointing is on; it disables the KV cache in training."""
    name = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else \
        "is_gradient_checkpointing"
    return bool(getattr(model, name, False))


def _groups_share_prompt(prompt_ids: Tensor, g: int) -> bool:
    b = prompt_ids.size(0)
    return b % g == 0 and torch.equal(prompt_ids, prompt_ids[::g].repeat_interleave(g, dim=0))


def _shared_prompt_logps(model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature,
                         output_hidden_states, g):
    out_p = model(input_ids=prompt_ids[::g], attention_mask=prompt_mask[::g], logits_to_keep=1, use_cache=True,
                  output_hidden_states=output_hidden_states)  # [B/G, P] once per group
    cache = out_p.past_key_values
    cache.batch_repeat_interleave(g)  # differentiable: gradients reach the prompt's keys and values
    out_c = model(input_ids=completion_ids, attention_mask=torch.cat([prompt_mask, completion_mask], dim=1),
                  past_key_values=cache, use_cache=True, output_hidden_states=output_hidden_states)
    first = out_p.logits[:, -1:, :].repeat_interleave(g, dim=0)  # predicts completion token 0
    logits = torch.cat([first, out_c.logits[:, :-1, :]], dim=1).float() / temperature  # [B, T, V]
    logps = selective_log_softmax(logits, completion_ids)
    hidden = None
    if output_hidden_states:
        hidden = tuple(torch.cat([hp.repeat_interleave(g, dim=0), hc], dim=1)
                       for hp, hc in zip(out_p.hidden_states, out_c.hidden_states, strict=True))
    return logps, hidden


def selective_log_softmax(logits: Tensor, index: Tensor) -> Tensor:
    """log_softmax(logits)[..., index] without materialising the full log-softmax (row by row)."""
    out = []
    for row_logits, row_index in zip(logits, index, strict=True):
        picked = row_logits.gather(-1, row_index.unsqueeze(-1)).squeeze(-1)
        out.append(picked - torch.logsumexp(row_logits, dim=-1))
    return torch.stack(out)
