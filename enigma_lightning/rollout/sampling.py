"""Sampling settings and the per-row random draws: :class:`SamplingConfig` (``conf/rollout/``), :func:`row_seeds`
(one seed per completion, independent of how the batch is split) and :class:`InverseCdfSampler`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(kw_only=True)
class SamplingConfig:
    """Sampling settings of the rollout; their defaults live in ``conf/rollout/default.yaml``."""

    max_new_tokens: int
    min_new_tokens: int  # > 0 suppresses EOS before this many tokens (fixed-length rollouts for benchmarks)
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    max_prompt_length: int | None  # longer prompts: see long_prompts
    long_prompts: str  # left: cut from the left (the question's end, template and prefill stay) | error
    seed_per_prompt: bool  # each completion's randomness from (seed, step, prompt, index): see row_seeds
    reserve_cache: bool  # KV cache written in place while sampling, not grown by torch.cat (see kvcache)
    share_prompts: bool  # prefill each distinct prompt (and shared opening) once, repeat its cache over G
    engine: Any = None  # the rollout engine (conf/rollout/engine/: hf | vllm); None: hf



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

