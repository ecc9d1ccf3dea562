"""What one step needs to know about the processes it runs in.

Each prompt's G completions are generated, rewarded and normalised on one rank (the data module gives every rank
whole prompts), so group advantages need no communication. What does: a global token count (dapo's normaliser, when a
term asks for it) and the logged metrics (means over ranks). Under FSDP every forward is collective, so generation
keeps ranks in step and every prompt runs whole.
"""

from __future__ import annotations

import torch


def is_distributed(trainer) -> bool:
    return trainer is not None and trainer.world_size > 1


def is_sharded(trainer) -> bool:
    """FSDP: every forward is collective, so generation must keep ranks in step."""
    if not is_distributed(trainer):
        return False
    from lightning.pytorch.strategies import FSDPStrategy

    return isinstance(trainer.strategy, FSDPStrategy)


def tokens_per_rank(trainer, mask: torch.Tensor) -> torch.Tensor:
    """The global batch's completion tokens divided by the world size: DDP averages gradients over ranks, so a term
    that divides by it normalises by the global count, as TRL's dapo does."""
    total = trainer.strategy.reduce(mask.sum().float(), reduce_op="sum")
    return total / trainer.world_size
