"""What one step needs to know about the processes it runs in.

Each prompt's G completions are generated, rewarded and normalised on one rank (the data module gives every rank
whole prompts), so group advantages need no communication. What does: a global token count (dapo's normaliser, when a
term asks for it), the terms that couple every completion of the step (OT's Sinkhorn cloud: :func:`gather_rows`) and
the logged metrics (means over ranks). Under FSDP every forward is collective, so generation keeps ranks in step and
every prompt runs whole.
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


class _GatherRows(torch.autograd.Function):
    """All ranks' rows of ``x`` [N_r, ...], concatenated in rank order; the gradient of this rank's rows, times the
    world size. Every rank computes the same function of the gathered tensor, and DDP and FSDP average gradients over
    ranks, so the average of the ranks' scaled gradients is the gradient of the one-process computation. No collective
    runs in the backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        world, rank = dist.get_world_size(), dist.get_rank()
        sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([x.size(0)], dtype=torch.long, device=x.device))
        counts = [int(s.item()) for s in sizes]
        longest = max(counts)
        padded = x.new_zeros((longest, *x.shape[1:]))
        padded[: x.size(0)] = x
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous())
        parts[rank] = x  # this rank's own rows, exactly
        ctx.start, ctx.count, ctx.world = sum(counts[:rank]), x.size(0), world
        return torch.cat([p[:n] for p, n in zip(parts, counts, strict=True)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad[ctx.start: ctx.start + ctx.count] * ctx.world


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """``x``'s rows on every rank, in rank order (the data module gives rank r the r-th slice of the global batch,
    so this is the one-process order); differentiable with respect to this rank's rows (:class:`_GatherRows`). Every
    rank must call it, with the same trailing shape."""
    return _GatherRows.apply(x)
