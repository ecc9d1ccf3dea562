"""The ENIGMA LightningModule: policy, frozen reference and principle encoder; one training step = one GRPO step.

``training_step``: rollout (G completions per prompt) -> rewards -> group-relative advantages -> policy forward
(and one reference forward when a term needs it) -> every selected loss term -> weighted sum -> metrics.

With ``grpo.num_iterations = n > 1`` a rollout is reused for n optimiser steps (the prompts drawn for the other
n - 1 steps are skipped), with the sampling policy's log-probs kept as ``old_logps``; with n = 1 the old
log-probs are the current ones detached (no extra forward), as in TRL.

Before each rollout the RNG is seeded from ``(seed, global_step, rank)``: sampling at step k is the same in a
run resumed at step k as in the uninterrupted run. The RNG state is also saved in checkpoints.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import lightning as L
import torch
from torch import nn

from .encoder import PrincipleEncoder
from .losses import GRPOLoss, LossTerm, StepInputs
from .metrics.rollout import rollout_metrics
from .models import ModelSpec, apply_lora, frozen_copy, load_policy, load_tokenizer
from .principles import PrincipleSet
from .prompts import PromptTemplate
from .rewards import RewardModel, answers_match, extract_answer, is_strict
from .rollout import SamplingConfig, generate, per_token_logps, row_seeds
from .scoring import rescore_mismatched, sami_scores

FROZEN_PREFIXES = ("reference.", "encoder.")


class EnigmaModule(L.LightningModule):
    def __init__(
        self,
        model: ModelSpec,
        terms: Mapping[str, LossTerm],
        reward: RewardModel,
        sampling: SamplingConfig,
        prompt: PromptTemplate,
        principles: PrincipleSet,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        encoder: PrincipleEncoder | None = None,
        lora: Any | None = None,
        seed: int = 0,
        num_samples_kept: int = 8,
    ):
        super().__init__()
        if "grpo" not in terms or not isinstance(terms["grpo"], GRPOLoss):
            raise ValueError("loss must include the grpo term")
        self.spec, self.sampling, self.prompt, self.principles = model, sampling, prompt, principles
        self.reward, self.optimizer_factory, self.scheduler_factory = reward, optimizer, scheduler
        self.seed, self.num_samples_kept = seed, num_samples_kept
        self.grpo: GRPOLoss = terms["grpo"]
        self.terms = dict(terms)
        self.term_modules = nn.ModuleDict({k: v for k, v in terms.items() if isinstance(v, nn.Module)})
        self.tokenizer = load_tokenizer(model)
        policy = load_policy(model)
        needs_ref = any(t.needs_reference for t in terms.values())
        # hidden-state layers any term reads (taken from the forwards the step already does)
        self.hidden_layers = sorted({layer for t in terms.values() if getattr(t, "needs_hidden_states", False)
                                     for layer in t.layers})
        # With LoRA the reference is the base model with the adapter disabled: no second copy of the weights.
        self.reference = frozen_copy(policy) if needs_ref and lora is None else None
        self.policy = apply_lora(policy, lora) if lora is not None else policy
        self.policy.train()  # from_pretrained returns eval mode; Lightning keeps submodule modes as they are
        self.uses_adapter_reference = needs_ref and lora is not None
        self.encoder = encoder
        # SAMI: each question's G completions are generated under K principle variants (G = K * m)
        self.num_variants = self.sami.num_variants if self.sami is not None else 1
        self.variants = principles.all_variants()[: self.num_variants] if self.sami is not None else [principles.text]
        if self.sami is not None:
            self.sami.setup(policy.config.hidden_size, encoder.dim if encoder is not None else None)
            emb = encoder.encode(self.variants) if self.sami.critic == "encoder" else torch.zeros(0)
            self.register_buffer("variant_embeddings", emb, persistent=False)
        self._buffer: dict[str, Any] | None = None
        self._reference_prefixes: dict = {}  # the frozen reference's KV cache of shared prompt openings
        self.last_samples: list[dict] = []
        self.last_completion_tokens = 0
        self.last_timings: dict[str, float] = {}
        self.sync_timings = False  # wait for the device before reading the clock (benchmarks; callbacks.timer)
        # the policy forward's logits take their own gradient in the backward (one logits-sized buffer, not two);
        # False to backward more than once through a step's graph (retain_graph: per-term gradient probes)
        self.overwrite_logits = True
        self.val_best: float | None = None

    @property
    def sami(self):
        """The SAMI term, if selected (registered once, under ``term_modules``)."""
        return self.terms.get("sami")

    # ---- prompts and rollout -------------------------------------------------------------------------------------
    def render(self, questions: list[str], variants: list[str] | None = None) -> list[str]:
        """Prompts ordered (question, variant); by default the set's own text only."""
        variants = variants or [self.principles.text]
        return [self.prompt.render(self.tokenizer, q, v) for q in questions for v in variants]

    @property
    def per_prompt(self) -> int:
        """Completions sampled per rendered prompt (m = G / K)."""
        return self.grpo.num_generations // self.num_variants

    def _clock(self) -> float:
        """The phase clock. On GPU the step runs ahead of the device, so phase times are host times unless
        ``sync_timings`` (then each reading waits for the device: true phase times, at the cost of syncs)."""
        if self.sync_timings and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _seed_step(self) -> None:
        s = hash((self.seed, self.global_step, self.global_rank)) % (2**31)
        torch.manual_seed(s)
        random.seed(s)

    def _prefixes(self, ro):
        """The rollout's shared-prefix plan; under FSDP every prompt runs whole (every rank runs the same forwards)."""
        return ro.prefixes.ungrouped() if self._sharded and ro.prefixes is not None else ro.prefixes

    def _forward(self, model, ro, rows: tuple[torch.Tensor, torch.Tensor] | None = None,
                 num_generations: int | None = None, compute_logps: bool = True, prefix_store: dict | None = None,
                 hidden: bool = True):
        """Completion log-probs (None when not ``compute_logps``) and {layer: completion-token hidden states
        [B, T, D]} for the layers the terms read (none when not ``hidden``). ``rows`` optionally gives (prompt rows,
        completion rows) to pair; by construction each prompt row repeats ``num_generations`` times in a row and the
        distinct prompts are the rollout's, in its order (no check, no device sync)."""
        p_rows, c_rows = rows if rows is not None else (slice(None), slice(None))
        return per_token_logps(
            model, ro.prompt_ids[p_rows], ro.prompt_mask[p_rows], ro.completion_ids[c_rows], ro.completion_mask[c_rows],
            self.sampling.temperature, hidden_layers=self.hidden_layers if hidden else (),
            num_generations=num_generations or self.per_prompt, shared_prompt=True, compute_logps=compute_logps,
            prefixes=self._prefixes(ro), prefix_store=prefix_store, overwrite_logits=self.overwrite_logits)

    def _sami_forward(self, ro, timings: dict[str, float] | None = None) -> tuple[torch.Tensor, dict, torch.Tensor]:
        """GRPO's log-probs and hidden states, and SAMI's K x K scores per question (:mod:`.scoring`). Exact SAMI
        scores every cell in GRPO's forward (one batch); with ``sami.negatives_grad=false`` the mismatched cells take
        a forward of their own, whose time goes to ``timings["sami_rescoring"]``."""
        forward, g, k = partial(self._forward, self.policy), self.grpo.num_generations, self.num_variants
        if self.sami.negatives_grad:
            return sami_scores(forward, ro, g, k)
        logps, hidden = forward(ro)
        t0 = self._clock()
        scores = rescore_mismatched(forward, ro, g, k, logps)
        if timings is not None:
            timings["sami_rescoring"] = self._clock() - t0
        return logps, hidden, scores

    def _reference_forward(self, ro):
        """One reference forward serves the KL (log-probs, only when ``grpo.beta != 0``) and OT (hidden states).
        The reference is frozen, so the KV cache of the prompts' shared openings is kept from step to step."""
        kwargs = dict(compute_logps=self.grpo.needs_reference, prefix_store=self._reference_prefixes)
        if self.reference is not None:
            return self._forward(self.reference, ro, **kwargs)
        with self.policy.disable_adapter():
            return self._forward(self.policy, ro, **kwargs)

    def _new_rollout(self, batch: dict[str, list]) -> dict[str, Any]:
        self._seed_step()
        g = self.grpo.num_generations
        prompts = self.render(batch["source"], self.variants)  # (question, variant) order
        t0 = self._clock()
        seeds = row_seeds(self.seed, self.global_step, prompts, self.per_prompt) if self.sampling.seed_per_prompt \
            else None
        ro = generate(self.policy, self.tokenizer, prompts, self.per_prompt, self.sampling,
                      prefill=self.prompt.prefill, seeds=seeds, synced_gpus=self._sharded)
        gen_time = self._clock() - t0
        columns = {k: [v for v in vals for _ in range(g)] for k, vals in batch.items()}
        rep_prompts = [p for p in prompts for _ in range(self.per_prompt)]
        t0 = self._clock()
        per_func, total = self.reward(rep_prompts, ro.completions, **columns)
        reward_time = self._clock() - t0
        advantages, std_zero = self.grpo.advantages(total.to(self.device))
        mask = ro.completion_mask
        if self.grpo.mask_truncated_completions:
            mask = mask * (~ro.truncated).unsqueeze(1).long()
        buf = dict(ro=ro, mask=mask, advantages=advantages, rewards=total, reward_list=total.tolist(),
                   per_func=per_func, std_zero=std_zero,
                   gen_time=gen_time, reward_time=reward_time, columns=columns, prompts=rep_prompts, old_logps=None,
                   ref_logps=None, ref_hidden={}, ref_time=0.0)
        with torch.no_grad():
            if self.grpo.num_iterations > 1:
                buf["old_logps"] = self._forward(self.policy, ro)[0]
            if self.reference is not None or self.uses_adapter_reference:
                t0 = self._clock()
                buf["ref_logps"], buf["ref_hidden"] = self._reference_forward(ro)
                buf["ref_time"] = self._clock() - t0
        return buf

    # ---- distributed ---------------------------------------------------------------------------------------------
    # Each prompt's G completions are generated, rewarded and normalised on one rank (the data module gives every
    # rank whole prompts), so group advantages need no communication. What does: the dapo normaliser (the global
    # token count) and the logged metrics (means over ranks).
    @property
    def _distributed(self) -> bool:
        return self._trainer is not None and self.trainer.world_size > 1

    @property
    def _sharded(self) -> bool:
        """FSDP: every forward is collective, so generation must keep ranks in step."""
        if not self._distributed:
            return False
        from lightning.pytorch.strategies import FSDPStrategy

        return isinstance(self.trainer.strategy, FSDPStrategy)

    def _tokens_per_rank(self, mask: torch.Tensor) -> torch.Tensor | None:
        """dapo normalises by the global batch's completion tokens; DDP then averages gradients over ranks, so each
        rank divides by (global tokens / world size), as TRL does. None on one process (the local count)."""
        if not self._distributed or self.grpo.loss_type != "dapo":
            return None
        total = self.trainer.strategy.reduce(mask.sum().float(), reduce_op="sum")
        return total / self.trainer.world_size

    # ---- training ------------------------------------------------------------------------------------------------
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Lightning's logging step counter is bumped by one on restore because it assumes the checkpoint was written
        # at the end of a batch; an exception checkpoint (OnExceptionCheckpoint) is written before the batch ran.
        # With one optimiser step per batch (validated), the counter must equal global_step.
        self.trainer.fit_loop.epoch_loop._batches_that_stepped = self.trainer.global_step

    def training_step(self, batch: dict[str, list], batch_idx: int) -> torch.Tensor:
        fresh = self._buffer is None or self.global_step % self.grpo.num_iterations == 0
        if fresh:
            self._buffer = self._new_rollout(batch)
        buf, ro = self._buffer, self._buffer["ro"]
        extras: dict[str, Any] = {"max_completion_length": self.sampling.max_new_tokens, "step": self.global_step,
                                  "ref_hidden": buf["ref_hidden"],
                                  "num_questions": ro.prompt_ids.size(0) // self.grpo.num_generations}
        t0, sami_timing = self._clock(), {}
        if self.sami is not None and self.sami.critic == "logprob":  # the forward also re-scores for SAMI
            logps, hidden, extras["sami_scores"] = self._sami_forward(ro, sami_timing)
        else:
            logps, hidden = self._forward(self.policy, ro)
        forward_time = self._clock() - t0 - sami_timing.get("sami_rescoring", 0.0)
        if self.sami is not None and self.sami.critic == "encoder":
            extras["variant_embeddings"] = self.variant_embeddings
        extras["hidden"] = hidden
        inputs = StepInputs(ro.prompt_ids, ro.prompt_mask, ro.completion_ids, buf["mask"], buf["advantages"], logps,
                            old_logps=buf["old_logps"], ref_logps=buf["ref_logps"],
                            num_items_in_batch=self._tokens_per_rank(buf["mask"]), extras=extras)
        total = logps.new_zeros(())
        metrics: dict[str, Any] = {}
        # a reused rollout (grpo.num_iterations > 1) costs nothing this step
        self.last_timings = {"generation": buf["gen_time"] if fresh else 0.0,
                             "reward": buf["reward_time"] if fresh else 0.0,
                             "reference": buf["ref_time"] if fresh else 0.0, "policy_forward": forward_time,
                             **sami_timing}
        for name, term in self.terms.items():
            t0 = self._clock()
            loss, term_metrics = term(inputs)
            self.last_timings[name] = self._clock() - t0
            total = total + term.weight * loss
            metrics[f"train/{name}/loss"] = loss.detach()
            metrics.update({f"train/{name}/{k}": v for k, v in term_metrics.items()})
        metrics["train/loss"] = total.detach()
        metrics.update(self._rollout_metrics(buf))
        # across ranks: the mean of the ranks' values (equal completions per rank, so the global mean)
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=logps.size(0), sync_dist=self._distributed)
        self.log("reward", metrics["train/reward/mean"], prog_bar=True, logger=False, batch_size=logps.size(0))
        self.log("format", metrics["train/format/strict_rate"], prog_bar=True, logger=False, batch_size=logps.size(0))
        self.last_completion_tokens = ro.completion_mask.sum()  # a tensor: read when logged, not now
        return total

    def _rollout_metrics(self, buf: dict[str, Any]) -> dict[str, Any]:
        ro, rewards = buf["ro"], buf["rewards"]
        m = rollout_metrics(ro, rewards, buf["per_func"], buf["std_zero"], buf["advantages"], self.reward.names)
        self.last_samples = [
            {"step": self.global_step, "prompt": p, "completion": c, "reward": float(r), "target": t}
            for p, c, r, t in zip(buf["prompts"], ro.completions, buf["reward_list"],
                                  buf["columns"].get("target", [None] * len(rewards)), strict=True)
        ][: self.num_samples_kept]
        return m

    # ---- validation: greedy decoding on the held-out split -------------------------------------------------------
    def validation_step(self, batch: dict[str, list], batch_idx: int) -> None:
        ro = generate(self.policy, self.tokenizer, self.render(batch["source"]), 1, self.sampling,
                      prefill=self.prompt.prefill, greedy=True, synced_gpus=self._sharded)
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

    # ---- optimiser -----------------------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith(FROZEN_PREFIXES)]

    def configure_optimizers(self):
        opt = self.optimizer_factory(self.trainable_parameters())
        if self.scheduler_factory is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.scheduler_factory(opt), "interval": "step"}}

    # ---- checkpoints: policy (and trainable term parameters) only, plus RNG state --------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        sd = checkpoint["state_dict"]
        for k in [k for k in sd if k.startswith(FROZEN_PREFIXES)]:
            del sd[k]
        checkpoint["rng"] = {"torch": torch.get_rng_state(), "python": random.getstate(),
                             "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
        checkpoint["val_best"] = self.val_best

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        sd = checkpoint["state_dict"]
        for k, v in self.state_dict().items():  # the frozen parts are rebuilt from their sources, not loaded
            if k.startswith(FROZEN_PREFIXES):
                sd[k] = v
        rng = checkpoint.get("rng")
        if rng:
            torch.set_rng_state(rng["torch"])
            random.setstate(rng["python"])
            if rng.get("cuda") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
        self.val_best = checkpoint.get("val_best")
