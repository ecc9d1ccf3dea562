"""Callbacks: step timing, sample completions (file + W&B table), the run summary and the final policy export."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import WandbLogger

from ..metrics.names import metric
from .folders import atomic_write_text


def _outdir(trainer: L.Trainer) -> Path:
    return Path(trainer.default_root_dir)


class StepTimer(L.Callback):
    """Logs ``perf/step_time`` (rollout + forward + backward + optimiser), ``perf/tokens_per_s`` (completion
    tokens of the step / step time), and for each timed phase (``generation``, ``reward``, ``reference`` forward,
    ``policy_forward``, each loss term's own computation, e.g. ``ot``) ``perf/<phase>_time`` in seconds and
    ``perf/<phase>_share`` of the step.

    On GPU the step does not wait for the device, so phase times are host-side times; ``sync_cuda=true``
    (``callbacks.timer.sync_cuda=true``) synchronises at each phase boundary for true device times, at the cost of
    those syncs."""

    def __init__(self, sync_cuda: bool = False):
        self.sync_cuda = sync_cuda

    def on_fit_start(self, trainer, pl_module) -> None:
        pl_module.sync_timings = self.sync_cuda

    def _now(self, pl_module) -> float:
        if self.sync_cuda and pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t0 = self._now(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        dt = self._now(pl_module) - self._t0
        pl_module.log("perf/step_time", dt, on_step=True, on_epoch=False)
        pl_module.log("perf/tokens_per_s", pl_module.last_completion_tokens / max(dt, 1e-9), on_step=True,
                      on_epoch=False)
        for phase, t in pl_module.last_timings.items():
            pl_module.log(f"perf/{phase}_time", t, on_step=True, on_epoch=False)
            pl_module.log(f"perf/{phase}_share", t / max(dt, 1e-9), on_step=True, on_epoch=False)


class CompletionSamples(L.Callback):
    """Every ``every_n_steps`` steps (from step 0) and at the last step, append the step's sample completions to
    ``samples.jsonl`` in the run folder and log them to W&B as a table (``samples/completions``)."""

    def __init__(self, every_n_steps: int = 5):
        self.every_n_steps = every_n_steps

    def on_train_start(self, trainer, pl_module) -> None:
        """A resumed run re-runs the steps after its checkpoint: their old rows go (nothing is written twice)."""
        path = _outdir(trainer) / "samples.jsonl"
        if not trainer.is_global_zero or not path.is_file():
            return
        lines = path.read_text().splitlines(keepends=True)
        keep = [line for line in lines if line.strip() and json.loads(line).get("step", -1) < trainer.global_step]
        if len(keep) != len(lines):
            atomic_write_text(path, "".join(keep))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step - 1
        last = trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps  # the last step is always kept
        if (step % self.every_n_steps != 0 and not last) or not trainer.is_global_zero or not pl_module.last_samples:
            return
        with open(_outdir(trainer) / "samples.jsonl", "a") as f:
            for s in pl_module.last_samples:
                f.write(json.dumps(s) + "\n")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                cols = list(pl_module.last_samples[0])  # step, prompt, completion, reward, target, log_extra columns
                logger.log_table("samples/completions", columns=cols,
                                 data=[[s[c] for c in cols] for s in pl_module.last_samples], step=trainer.global_step)


class RunSummary(L.Callback):
    """Writes ``summary.json``: the final value, the first value and the mean of the first/last ``window`` steps of
    every logged scalar, the step count and wall time. Written at the end of fit and on an exception."""

    def __init__(self, window: int = 3, watch: tuple[str, ...] = ("train/reward/mean", "train/format/strict_rate",
                                                                   "train/reward/format/mean"),
                 tags: list[str] | None = None):
        watch = tuple(metric(k) for k in watch)
        self.window, self.watch, self.tags = window, watch, [str(t) for t in tags or []]
        self.history: dict[str, list[float]] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self._t0 = time.time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        for k, v in trainer.callback_metrics.items():
            if k.startswith(("train/", "perf/")):
                self.history.setdefault(k, []).append(float(v))

    def summary(self, trainer, status: str) -> dict[str, Any]:
        final = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
        trends = {}
        for k in self.watch:
            h = [x for x in self.history.get(k, []) if not math.isnan(x)]
            if h:
                w = min(self.window, len(h))
                trends[k] = {"first": h[0], "last": h[-1], "start_mean": sum(h[:w]) / w, "end_mean": sum(h[-w:]) / w}
        ckpt = trainer.checkpoint_callback
        return {"status": status, "tags": self.tags, "global_step": trainer.global_step,
                "wall_time_s": time.time() - self._t0,
                "final": final, "trends": trends, "last_checkpoint": getattr(ckpt, "last_model_path", None) or None}

    def _write(self, trainer, status: str) -> None:
        if not trainer.is_global_zero or not hasattr(self, "_t0"):
            return
        s = self.summary(trainer, status)
        atomic_write_text(_outdir(trainer) / "summary.json", json.dumps(s, indent=2, sort_keys=True))
        for k, t in s["trends"].items():
            print(f"{k}: start {t['start_mean']:.3f} -> end {t['end_mean']:.3f} (mean of first/last {self.window} steps)")

    def on_train_end(self, trainer, pl_module) -> None:
        self._write(trainer, "finished")

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._write(trainer, f"failed: {type(exception).__name__}: {exception}")


class ExportPolicy(L.Callback):
    """At the end of training, save the policy (or its LoRA adapter) and tokenizer with ``save_pretrained`` to
    ``<run dir>/<dirname>``, loadable by ``AutoModelForCausalLM.from_pretrained``."""

    def __init__(self, dirname: str = "policy"):
        self.dirname = dirname

    def on_train_end(self, trainer, pl_module) -> None:
        from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

        state_dict = None
        if isinstance(trainer.strategy, FSDPStrategy):  # gather the shards (a collective: every rank calls it)
            full = trainer.strategy.lightning_module_state_dict()
            state_dict = {k.removeprefix("policy."): v for k, v in full.items() if k.startswith("policy.")}
        elif isinstance(trainer.strategy, ModelParallelStrategy):  # FSDP2: gathered to rank 0 (every rank calls it)
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            state_dict = get_model_state_dict(pl_module.policy, options=StateDictOptions(full_state_dict=True,
                                                                                          cpu_offload=True))
            # gathered separately, tied weights (lm_head = embeddings) are no longer one tensor: keep the first name,
            # as save_pretrained of the unsharded model does
            seen: set[int] = set()
            for name, p in pl_module.policy.named_parameters(remove_duplicate=False):
                if id(p) in seen:
                    state_dict.pop(name, None)
                seen.add(id(p))
        if trainer.is_global_zero:
            out = _outdir(trainer) / self.dirname
            # a copy: save_pretrained empties the dict it is given. Under PEFT it keeps the adapter's entries only
            pl_module.policy.save_pretrained(out, **({"state_dict": dict(state_dict)} if state_dict is not None
                                                     else {}))
            pl_module.tokenizer.save_pretrained(out)


class FinalCheckpoint(L.Callback):
    """Save ``<dirpath>/last.ckpt`` at the end of training, so the last step is always resumable/loadable."""

    def __init__(self, dirpath: str, filename: str = "last.ckpt"):
        self.path = Path(dirpath) / filename

    def on_train_end(self, trainer, pl_module) -> None:
        if self.path.is_symlink():
            self.path.unlink()
        trainer.save_checkpoint(self.path)


class ProgressBar(TQDMProgressBar):
    """Lightning's progress bar without the logger's version tag: shows step, reward and format rate. Honours
    tqdm's ``TQDM_DISABLE=1`` (Lightning's own bar ignores it). The rate reads ``s/it`` when a step takes longer
    than a second (Lightning's format always shows ``it/s``: ``0.00it/s`` for a 10-minute step)."""

    BAR_FORMAT = TQDMProgressBar.BAR_FORMAT.replace("{rate_noinv_fmt}", "{rate_fmt}")

    def __init__(self, refresh_rate: int = 1, **kwargs):
        super().__init__(refresh_rate=refresh_rate, **kwargs)
        if os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes"):
            self.disable()

    def get_metrics(self, trainer, pl_module) -> dict:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items
