"""``callbacks=probes``: geometry probes every N training steps."""

from __future__ import annotations

from pathlib import Path

import lightning as L

from .compare import compare, probe_texts


class ProbeCallback(L.Callback):
    """Probes during training (``callbacks=probes``): every ``every_n_steps`` steps, the policy against the frozen
    base model on a small probe set. Logs ``probe/<measure>/mean`` (over layers) and ``probe/<measure>/last`` and
    writes ``<run dir>/probes/step<NNNNNN>/`` (JSON, markdown, PNG). When the run keeps no frozen reference
    (``loss=grpo`` with ``grpo.beta=0``), the callback loads its own copy of the base model on first use."""

    def __init__(self, every_n_steps: int = 10, num_questions: int = 8, layers: list[int] | str = "all",
                 fisher_rao_layers: str = "last", epsilon: float = 0.05, max_points: int = 512, batch_size: int = 8,
                 questions: str = "bundled_eval", write_files: bool = True):
        self.every_n_steps, self.num_questions, self.layers = every_n_steps, num_questions, layers
        self.fisher_rao_layers, self.epsilon, self.max_points = fisher_rao_layers, epsilon, max_points
        self.batch_size, self.questions, self.write_files = batch_size, questions, write_files
        self._reference = None
        self._texts: dict[str, list[str]] | None = None  # the probe set, rendered once

    def setup(self, trainer, pl_module, stage: str) -> None:
        from ..errors import EnigmaError
        from ..step.distributed import is_sharded_strategy

        if is_sharded_strategy(trainer.strategy):  # probes run on rank 0 alone; sharded forwards are collective
            raise EnigmaError("callbacks=probes does not run under trainer=fsdp (its forwards would wait on the other "
                              "ranks). Use trainer=ddp or one device, or probe checkpoints with "
                              "python -m enigma_lightning.probe ckpt_path=...")

    def _ref(self, pl_module):
        if pl_module.reference is not None:
            return pl_module.reference
        if self._reference is None:
            from ..models.loading import load_policy

            self._reference = load_policy(pl_module.spec).eval().requires_grad_(False).to(pl_module.device)
        return self._reference

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every_n_steps != 0 or not trainer.is_global_zero:
            return
        policy = pl_module.policy  # with LoRA, the adapted model
        if self._texts is None:
            self._texts = probe_texts(pl_module.tokenizer, pl_module.prompt, pl_module.principles, self.questions,
                                      self.num_questions, pl_module.seed)
        texts = self._texts
        was_training = policy.training
        policy.eval()
        try:
            result = compare(policy, self._ref(pl_module), pl_module.tokenizer, texts, self.layers,
                             self.fisher_rao_layers, self.batch_size, self.epsilon, self.max_points, pl_module.seed)
        finally:
            policy.train(was_training)
        # straight to the loggers, in the row of the step that just ran (self.log would repeat the value in later rows)
        metrics = {f"probe/{k}": v for k, v in result["summary"].items()}
        for lg in trainer.loggers:
            lg.log_metrics(metrics, step=step - 1)
        if self.write_files:
            from .outputs import write_outputs

            write_outputs(result, Path(trainer.default_root_dir) / "probes" / f"step{step:06d}", f"step {step}")
