"""A step whose loss, gradients or rewards are not finite is never applied (:class:`NonFiniteGuard`), a checkpoint
is never written from non-finite weights or from a run that made no progress (:class:`ExceptionCheckpoint`), and a
SIGTERM stops every rank between the same two steps (:class:`SignalStop`)."""

from __future__ import annotations

import logging

import lightning as L
import torch
from lightning.pytorch.callbacks import OnExceptionCheckpoint

from ..errors import EnigmaError

log = logging.getLogger(__name__)
MODES = ("stop", "skip")


class NonFiniteError(EnigmaError):
    """A training step produced a non-finite loss, gradient, reward or weight."""


def _trainable(pl_module) -> list[torch.nn.Parameter]:
    return [p for p in pl_module.parameters() if p.requires_grad]


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 (DTensor) tensor; the tensor itself otherwise."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every tensor is finite; for sharded (DTensor) tensors over every rank's shard (a collective then)."""
    tensors = [t for t in tensors if t is not None]
    if not tensors:
        return True
    from torch.distributed.tensor import DTensor

    local = [_local(t).detach() for t in tensors]
    ok = torch.isfinite(torch.stack([t.float().norm() for t in local])).all()
    if any(isinstance(t, DTensor) for t in tensors) and torch.distributed.is_initialized():
        flag = ok.to(torch.float32).reshape(1)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)  # every rank decides the same
        ok = flag[0] > 0
    return bool(ok)


class NonFiniteGuard(L.Callback):
    """Checks each step before the optimiser applies it: the loss (before the backward), the gradients and the
    rewards the reward functions returned. ``on_nonfinite=stop`` (default) raises :class:`NonFiniteError` naming the
    step and the quantity, with the weights as they were before the step (so ``interrupted.ckpt`` and every kept
    checkpoint are finite); ``skip`` drops the step's gradients (the optimiser leaves the weights alone), logs
    ``train/nonfinite_skipped`` and goes on. The weights are checked after each step as well."""

    def __init__(self, on_nonfinite: str = "stop"):
        if on_nonfinite not in MODES:
            raise ValueError(f"callbacks.guard.on_nonfinite must be stop or skip; got {on_nonfinite!r}")
        self.on_nonfinite = on_nonfinite
        self.bad: list[str] = []
        self.skipped = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.bad = []

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss.detach()).all():
            self.bad.append(f"the loss is {float(loss.detach()):g}")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        reward = getattr(pl_module, "reward", None)
        nonfinite = dict(getattr(reward, "last_nonfinite", {}) or {})
        if nonfinite:
            self.bad.append("reward functions returned NaN or inf: " +
                            ", ".join(f"{k} ({n} values)" for k, n in nonfinite.items()))
        pl_module.log("train/reward/nonfinite", float(sum(nonfinite.values())), on_step=True, on_epoch=False)
        params = _trainable(pl_module)
        grads = [p.grad for p in params if p.grad is not None]
        if not all_finite(grads):
            n = sum(not bool(torch.isfinite(_local(g)).all()) for g in grads)  # on this rank's shards
            self.bad.append(f"the gradients of {n} of {len(grads)} parameter tensors are not finite")
        if not self.bad:
            return
        step = trainer.global_step
        what = "; ".join(self.bad)
        if self.on_nonfinite == "skip":
            for p in params:
                p.grad = None
            self.skipped += 1
            pl_module.log("train/nonfinite_skipped", 1.0, on_step=True, on_epoch=False)
            log.warning("step %d skipped (not applied): %s", step, what)
            return
        raise NonFiniteError(
            f"step {step}: {what}. The step was not applied: the weights are "
            + (f"those after step {step - 1}" if step else "the initial ones")
            + ", and the checkpoints hold finite weights. Lower optim.optimizer.lr (or keep step.max_grad_norm), check the "
            "reward functions, or set callbacks.guard.on_nonfinite=skip to skip such steps")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not all_finite(_trainable(pl_module)):
            raise NonFiniteError(f"step {trainer.global_step - 1}: the weights are not finite after the optimiser "
                                 "step (finite loss and gradients). No checkpoint is written from them; resume from "
                                 "the last kept checkpoint with a lower optim.optimizer.lr")


class ExceptionCheckpoint(OnExceptionCheckpoint):
    """Lightning's checkpoint on an exception (``checkpoints/interrupted.ckpt``), written only when the run made
    progress since it started or resumed (a failed restore or a crash before the first step leaves the folder as
    it was) and the weights are finite (a diverged run keeps its last good checkpoint)."""

    def on_train_start(self, trainer, pl_module) -> None:
        self._start_step = trainer.global_step

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        start = getattr(self, "_start_step", None)
        if start is None or trainer.global_step <= start:
            log.warning("no progress since the run started: %s not written", self.ckpt_path)
            return
        if not all_finite(_trainable(pl_module)):
            log.warning("the weights are not finite: %s not written; the last kept checkpoint stands", self.ckpt_path)
            return
        super().on_exception(trainer, pl_module, exception)


class SignalStop(L.Callback):
    """SIGTERM (a scheduler stopping or preempting the job, ``kill``) stops the run between two steps, on every rank
    at the same step: ``checkpoints/interrupted.ckpt`` is written and the command exits 143.

    The handler only records the signal. At the start of each training batch the ranks agree on it (any rank's
    signal counts: one all-reduce of a flag per step), and all of them raise Lightning's ``SIGTERMException``
    there. It replaces Lightning's own SIGTERM handler, which runs a collective inside the signal handler: with
    several processes that collective lands between unrelated ones (a rank signalled twice, by the scheduler and by
    rank 0 forwarding it, runs it twice) and the process group fails instead of checkpointing."""

    def __init__(self) -> None:
        self.received = False
        self._previous = None

    def _handler(self, signum, frame) -> None:
        self.received = True

    def on_train_start(self, trainer, pl_module) -> None:
        import signal
        import threading

        self.received = False
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            self._previous = signal.signal(signal.SIGTERM, self._handler)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if trainer.strategy.reduce_boolean_decision(self.received, all=False):
            log.warning("SIGTERM received: stopping before step %d", trainer.global_step)
            raise SIGTERMException

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore()

    def _restore(self) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
