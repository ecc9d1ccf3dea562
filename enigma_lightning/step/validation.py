"""Validation: greedy decoding on the held-out split, scored for strict format and correctness (``val/*``)."""

from __future__ import annotations

from ..rewards import answers_match, extract_answer, is_strict


class GreedyValidation:
    """LightningModule hooks for :class:`~.module.EnigmaModule` (policy, tokenizer, prompt, sampling, engine,
    ``render``): the held-out prompts are decoded by the rollout engine."""

    def validation_step(self, batch: dict[str, list], batch_idx: int) -> None:
        self.engine.sync(self.policy, self.tokenizer, self.sampling, self.global_step)
        ro = self.engine.generate(self.policy, self.tokenizer, self.render(batch["source"]), 1, self.sampling,
                                  prefill=self.prompt.prefill, greedy=True, synced_gpus=self._sharded,
                                  version=self.global_step)
        strict = [is_strict(c) for c in ro.completions]
        correct = [s and answers_match(extract_answer(c), t) for s, c, t in zip(strict, ro.completions,
                                                                                  batch["target"], strict=True)]
        n = len(strict)
        self.log("val/format_rate", sum(strict) / n, batch_size=n, on_epoch=True, sync_dist=self._distributed)
        self.log("val/accuracy", sum(correct) / n, batch_size=n, on_epoch=True, sync_dist=self._distributed)
        self.log("val/completions/mean_length", ro.lengths.float().mean().item(), batch_size=n, on_epoch=True,
                 sync_dist=self._distributed)

    def on_validation_epoch_end(self) -> None:
        acc = self.trainer.callback_metrics.get("val/accuracy")
        if acc is not None and not self.trainer.sanity_checking:
            self.val_best = float(acc) if self.val_best is None else max(self.val_best, float(acc))
            self.log("val/accuracy_best", self.val_best, sync_dist=self._distributed)  # the same on every rank

