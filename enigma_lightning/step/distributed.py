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


def uses_fsdp2(trainer) -> bool:
    """``trainer=fsdp`` / ``fsdp_cpu``: the module shards itself in ``configure_model`` (:mod:`.sharding`)."""
    if trainer is None:
        return False
    from lightning.pytorch.strategies import ModelParallelStrategy

    return isinstance(trainer.strategy, ModelParallelStrategy)


def is_sharded_strategy(strategy) -> bool:
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    return isinstance(strategy, FSDPStrategy | ModelParallelStrategy)


def is_sharded(trainer) -> bool:
    """FSDP: every forward is collective, so generation must keep ranks in step."""
    return is_distributed(trainer) and is_sharded_strategy(trainer.strategy)


def tokens_per_rank(trainer, mask: torch.Tensor) -> torch.Tensor:
    """The global batch's completion tokens divided by the world size: DDP and FSDP average gradients over ranks, so
    a term that divides by it normalises by the global count, as TRL's dapo does."""
    total = trainer.strategy.reduce(mask.sum().float(), reduce_op="sum")
    return total / trainer.world_size
