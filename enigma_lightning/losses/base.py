"""What every loss term sees, and the interface it implements."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from torch import Tensor


@dataclass
class StepInputs:
    """Tensors of one training step. B = completions in the step, T = completion length (right padded)."""

    prompt_ids: Tensor  # [B, P] left padded
    prompt_mask: Tensor  # [B, P]
    completion_ids: Tensor  # [B, T]
    completion_mask: Tensor  # [B, T] 1 up to and including the first EOS (0 for masked truncated completions)
    advantages: Tensor  # [B]
    logps: Tensor  # [B, T] policy per-token log-probs (with grad)
    old_logps: Tensor | None = None  # [B, T] log-probs of the policy that sampled (None: on-policy, = logps.detach())
    ref_logps: Tensor | None = None  # [B, T] frozen reference log-probs
    num_items_in_batch: Tensor | None = None  # completion tokens in the global batch (dapo normaliser)
    extras: dict = field(default_factory=dict)  # term-specific inputs (hidden states, principle variants, ...)


class LossTerm(Protocol):
    """A term of the ENIGMA objective. ``__call__`` returns ``(loss, metrics)``; metric names are relative
    (``clip_ratio``) and the module prefixes them with ``train/<term>/``."""

    name: str
    weight: float

    @property
    def needs_reference(self) -> bool: ...

    def __call__(self, inputs: StepInputs) -> tuple[Tensor, dict[str, Tensor]]: ...
