"""What every rollout engine (``rollout/engine``: :class:`~.hf.HFEngine`, :class:`~.vllm.VLLMEngine`) returns: :class:`Rollout` (prompt and completion ids, masks, truncation flags, texts),
whichever engine sampled it, so rewards, losses and metrics never know which one ran."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .prefix import PrefixPlan


@dataclass
class Rollout:
    prompt_ids: Tensor  # [B, P] left padded; B = prompts * G, each prompt's G completions consecutive
    prompt_mask: Tensor  # [B, P]
    completion_ids: Tensor  # [B, T] right padded with pad_token_id after the first EOS
    completion_mask: Tensor  # [B, T] 1 up to and including the first EOS
    truncated: Tensor  # [B] bool: no EOS within max_new_tokens
    completions: list[str]  # decoded completions, assistant prefill prepended
    prefixes: PrefixPlan | None = None  # shared openings of the distinct prompts (rows[::G]); host data
    sampling_logps: Tensor | None = None  # [B, T] the engine's log-probs of its samples (None: the policy sampled)
    exact_logps: bool = True  # the engine computes in the policy's precision (float32+): its log-probs are the policy's

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

