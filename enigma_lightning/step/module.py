"""The ENIGMA LightningModule: policy, frozen reference and principle encoder; one training step = one GRPO step.

``training_step``: rollout (G completions per prompt, under K principle variants when a term asks for them) ->
rewards -> group-relative advantages (:mod:`.group`) -> the forwards the selected terms need, computed once for
their union (:mod:`.forwards`) -> each term's ``prepare`` hook -> every term's loss -> weighted sum -> metrics.
The module never names a term: terms declare what they need (:mod:`enigma_lightning.losses.base`).

With ``step.num_iterations = n > 1`` a rollout is reused for n optimiser steps (the prompts drawn for the other
n - 1 steps are skipped), with the sampling policy's log-probs kept as ``old_logps``; with n = 1 the old
log-probs are the current ones detached (no extra forward), as in TRL.

Before each rollout the RNG is seeded from ``(seed, global_step, rank)``: sampling at step k is the same in a
run resumed at step k as in the uninterrupted run. The RNG state is also saved in checkpoints.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from functools import partial, reduce
from typing import Any

import lightning as L
import torch
from torch import nn

from ..data.principles import PrincipleSet
from ..data.prompts import PromptTemplate
from ..losses.base import Layout, LossTerm, Needs, StepBatch, check_layers
from ..metrics.rollout import logprob_gap, rollout_metrics, sample_rows
from ..models.encoder import PrincipleEncoder
from ..models.loading import ModelSpec, apply_lora, frozen_copy, load_policy, load_tokenizer
from ..rewards import RewardModel, token_lists, trainer_state
from ..rollout.hf import HFEngine
from ..rollout.sampling import SamplingConfig, row_seeds
from .checkpoint import FROZEN_PREFIXES, restore_frozen, strip_frozen
from .distributed import gather_rows, is_distributed, is_sharded, tokens_per_rank, uses_fsdp2
from .forwards import StepForwards, objective
from .group import GroupConfig
from .microbatch import cached_forwards, replay
from .sharding import grad_norm, is_fully_sharded, shard, shard_trainable, unregister
from .validation import GreedyValidation


class EnigmaModule(GreedyValidation, L.LightningModule):
    def __init__(
        self,
        *,
        model: ModelSpec,
        terms: Mapping[str, LossTerm],
        group: GroupConfig,
        reward: RewardModel,
        sampling: SamplingConfig,
        prompt: PromptTemplate,
        principles: PrincipleSet,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        encoder: PrincipleEncoder | None = None,
        lora: Any | None = None,
        seed: int,
        num_samples_kept: int = 8,
    ):
        super().__init__()
        if not terms:
            raise ValueError("loss selects no term; select terms with loss=<name> or loss=[<name>,...] (conf/loss/)")
        self.spec, self.sampling, self.prompt, self.principles = model, sampling, prompt, principles
        self.reward, self.optimizer_factory, self.scheduler_factory = reward, optimizer, scheduler
        self.group, self.seed, self.num_samples_kept = group, seed, num_samples_kept
        self.terms = nn.ModuleDict(dict(terms))  # in the order selected; their parameters train with the policy
        self.needs: Needs = reduce(Needs.union, (t.needs() for t in self.terms.values()), Needs())
        self.tokenizer = load_tokenizer(model)
        policy = load_policy(model)
        # With LoRA the reference is the base model with the adapter disabled: no second copy of the weights.
        self.reference = frozen_copy(policy) if self.needs.reference and lora is None else None
        self.policy = apply_lora(policy, lora) if lora is not None else policy
        self.policy.train()  # from_pretrained returns eval mode; Lightning keeps submodule modes as they are
        self.uses_adapter_reference = self.needs.reference and lora is not None
        self.encoder = encoder
        # each question's G completions are generated under K principle variants (G = K * m) when a term asks
        self.num_variants = self.needs.num_variants
        self.variants = principles.all_variants()[: self.num_variants] if self.num_variants > 1 else [principles.text]
        check_layers(self.terms, policy.config, model.name_or_path)
        for term in self.terms.values():
            term.setup(hidden_size=policy.config.hidden_size, encoder_dim=encoder.dim if encoder is not None else None)
        if self.needs.principle_embeddings and encoder is None:
            raise ValueError("a loss term needs principle embeddings; set encoder=minilm")
        emb = encoder.encode(self.variants) if self.needs.principle_embeddings else torch.zeros(0)
        self.register_buffer("principle_embeddings", emb, persistent=False)
        self.forwards = StepForwards(self.needs, sampling.temperature, group.micro_batch_size)
        self.engine = sampling.engine if sampling.engine is not None else HFEngine()  # conf/rollout/engine/
        self.automatic_optimization = False  # training_step steps the optimiser (micro-batched backward)
        self._buffer: dict[str, Any] | None = None
        self.last_samples: list[dict] = []
        self.last_completion_tokens = 0
        self.last_timings: dict[str, float] = {}
        self.sync_timings = False  # wait for the device before reading the clock (benchmarks; callbacks.timer)
        self.val_best: float | None = None

    # ---- prompts and rollout -------------------------------------------------------------------------------------
    def render(self, questions: list[str], variants: list[str] | None = None) -> list[str]:
        """Prompts ordered (question, variant); by default the set's own text only."""
        variants = variants or [self.principles.text]
        return [self.prompt.render(self.tokenizer, q, v) for q in questions for v in variants]

    @property
    def per_prompt(self) -> int:
        """Completions sampled per rendered prompt (m = G / K)."""
        return self.group.num_generations // self.num_variants

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

    def _new_rollout(self, batch: dict[str, list]) -> dict[str, Any]:
        self._seed_step()
        self.forwards.sharded = self._sharded
        g = self.group.num_generations
        prompts = self.render(batch["source"], self.variants)  # (question, variant) order
        t0 = self._clock()
        # the engine samples from the weights of this step (vllm: loaded after each optimiser step; hf: the policy)
        self.engine.sync(self.policy, self.tokenizer, self.sampling, self.global_step)
        sync_time = self._clock() - t0
        t0 = self._clock()
        seeds = row_seeds(self.seed, self.global_step, prompts, self.per_prompt) if self.sampling.seed_per_prompt \
            else None
        ro = self.engine.generate(self.policy, self.tokenizer, prompts, self.per_prompt, self.sampling,
                                  prefill=self.prompt.prefill, seeds=seeds, synced_gpus=self._sharded,
                                  version=self.global_step)
        gen_time = self._clock() - t0
        columns = {k: [v for v in vals for _ in range(g)] for k, vals in batch.items()}
        rep_prompts = [p for p in prompts for _ in range(self.per_prompt)]
        t0 = self._clock()
        # as TRL calls rewards (enigma_lightning.rewards.combine): token ids, the run's progress, the chat messages
        messages = [self.prompt.messages(q, v) for q in batch["source"] for v in self.variants
                    for _ in range(self.per_prompt)]
        per_func, total = self.reward(rep_prompts, ro.completions, prompt_messages=messages,
                                      completion_ids=token_lists(ro.completion_ids, ro.completion_mask),
                                      trainer_state=trainer_state(self.global_step, self._max_steps(),
                                                                  self.current_epoch), **columns)
        reward_time = self._clock() - t0
        advantages, std_zero = self.group.advantages(total.to(self.device))
        buf = dict(ro=ro, mask=self.group.loss_mask(ro.completion_mask, ro.truncated), advantages=advantages,
                   rewards=total, reward_list=total.tolist(), per_func=per_func, std_zero=std_zero,
                   gen_time=gen_time, sync_time=sync_time, reward_time=reward_time, columns=columns,
                   prompts=rep_prompts, old_logps=None, ref_logps=None, ref_hidden={}, ref_time=0.0,
                   layout=Layout(len(batch["source"]), self.num_variants, g),
                   extra=dict(getattr(self.reward, "last_extra", {})))  # TRL's log_extra columns
        with torch.no_grad():
            if self.group.num_iterations > 1:
                buf["old_logps"] = self.forwards.forward(self.policy, ro, per_prompt=self.per_prompt, hidden=False)[0]
            if self.reference is not None or self.uses_adapter_reference:
                t0 = self._clock()
                buf["ref_logps"], buf["ref_hidden"] = self.forwards.reference(self.reference, self.policy, ro,
                                                                              self.per_prompt)
                buf["ref_time"] = self._clock() - t0
        return buf

    def _max_steps(self) -> int:
        return self._trainer.max_steps if self._trainer is not None else -1

    # ---- distributed (:mod:`.distributed`) ---------------------------------------------------------------------
    @property
    def _distributed(self) -> bool:
        return is_distributed(self._trainer)

    @property
    def _sharded(self) -> bool:
        return is_sharded(self._trainer)

    def configure_model(self) -> None:
        """Under ``trainer=fsdp``/``fsdp_cpu`` (FSDP2, :mod:`.sharding`): shard the policy and the frozen reference
        over the data-parallel mesh, and keep the frozen modules out of checkpoints. Lightning calls this on every
        fit and validate; the models are sharded once. Other strategies: nothing to do."""
        if not uses_fsdp2(self._trainer) or is_fully_sharded(self.policy):
            return
        mesh = self.device_mesh["data_parallel"]
        for name in ("reference", "encoder"):
            unregister(self, name)
        shard(self.policy, mesh)
        if self.reference is not None:
            shard(self.reference, mesh, frozen=True)
        if self.encoder is not None:  # frozen, small, used whole on every rank: a full copy on each device
            self.encoder.to(self.trainer.strategy.root_device)
        shard_trainable(self.terms, mesh)

    def _tokens_per_rank(self, mask: torch.Tensor) -> torch.Tensor | None:
        """dapo's global token count per rank, when a term asks for it; None on one process (the local count)."""
        return tokens_per_rank(self.trainer, mask) if self._distributed and self.needs.global_token_count else None

    # ---- training ------------------------------------------------------------------------------------------------
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Lightning's logging step counter is bumped by one on restore because it assumes the checkpoint was written
        # at the end of a batch; an exception checkpoint (OnExceptionCheckpoint) is written before the batch ran.
        # With one optimiser step per batch (validated), the counter must equal global_step.
        self.trainer.fit_loop.epoch_loop._batches_that_stepped = self.trainer.global_step

    def training_step(self, batch: dict[str, list], batch_idx: int) -> torch.Tensor:
        """One rollout (or the reused one), one optimiser step. Optimisation is manual: the backward may run in
        micro-batches (:meth:`forward_backward`); clipping (``step.max_grad_norm``) and the scheduler as Lightning's
        automatic optimisation does them."""
        opt = self.optimizers()
        opt.zero_grad()
        loss = self.forward_backward(batch)
        # before clipping; global over ranks (DDP's gradients are all-reduced, FSDP's norm is reduced over shards)
        self.log("train/grad_norm", grad_norm(self.trainable_parameters()).detach(), on_step=True, on_epoch=False,
                 batch_size=1)
        if self.group.max_grad_norm:
            self.clip_gradients(opt, gradient_clip_val=self.group.max_grad_norm, gradient_clip_algorithm="norm")
        opt.step()
        if (scheduler := self.lr_schedulers()) is not None:
            scheduler.step()
        return loss

    def forward_backward(self, batch: dict[str, list]) -> torch.Tensor:
        """Rollout, forwards, every term, and the backward (gradients accumulate in ``.grad``); returns the loss,
        detached. With ``step.micro_batch_size`` below the step's rows, in micro-batches (:mod:`.microbatch`)."""
        fresh = self._buffer is None or self.global_step % self.group.num_iterations == 0
        if fresh:
            self._buffer = self._new_rollout(batch)
        buf, ro = self._buffer, self._buffer["ro"]
        # a reused rollout (step.num_iterations > 1) costs nothing this step
        timings = {"generation": buf["gen_time"] if fresh else 0.0, "reward": buf["reward_time"] if fresh else 0.0,
                   "reference": buf["ref_time"] if fresh else 0.0}
        if buf["ro"].sampling_logps is not None:  # an engine outside the policy: loading the weights into it
            timings["weight_sync"] = buf["sync_time"] if fresh else 0.0
        requests = self.forwards.requests(dict(self.terms), buf["layout"], self.per_prompt, ro.completion_ids.device)
        mb = self.group.micro_batch_size
        cached = mb is not None and any(r.size(ro) > mb for r in requests)
        step, outs = self._step_inputs(buf, timings, requests, cached)
        total, metrics = objective(self.terms, step, self._clock, timings)
        t0 = self._clock()
        self._backward(total)
        self.last_micro_batches = 1
        if cached:  # the micro-batches' forwards and backwards, with the gradients the whole step gave the leaves
            self.last_micro_batches = replay(self.forwards, self.policy, ro, requests, outs, self._backward)
        timings["backward"] = self._clock() - t0
        self.last_timings = timings
        metrics["train/loss"] = total.detach()
        metrics.update(self._rollout_metrics(buf))
        if fresh and ro.sampling_logps is not None:  # the engine's log-probs against the policy that trains on them
            policy_logps = buf["old_logps"] if buf["old_logps"] is not None else step.logps.detach()
            metrics.update(logprob_gap(policy_logps, ro.sampling_logps, ro.completion_mask))
        n = step.logps.size(0)
        # across ranks: the mean of the ranks' values (equal completions per rank, so the global mean)
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=n, sync_dist=self._distributed)
        self.log("reward", metrics["train/reward/mean"], prog_bar=True, logger=False, batch_size=n)
        self.log("format", metrics["train/format/strict_rate"], prog_bar=True, logger=False, batch_size=n)
        self.last_completion_tokens = ro.completion_mask.sum()  # a tensor: read when logged, not now
        return total.detach()

    def _backward(self, loss: torch.Tensor) -> None:
        self.manual_backward(loss) if self._trainer is not None else loss.backward()

    def step_batch(self, buf: dict[str, Any], timings: dict[str, float]) -> StepBatch:
        """What the terms read this step: the policy forward (with every term's scored rows), the reference's
        outputs kept with the rollout, and each term's ``prepare`` result. Phase times go to ``timings``."""
        ro = buf["ro"]
        requests = self.forwards.requests(dict(self.terms), buf["layout"], self.per_prompt, ro.completion_ids.device)
        return self._step_inputs(buf, timings, requests, cached=False)[0]

    def _step_inputs(self, buf: dict[str, Any], timings: dict[str, float], requests: list, cached: bool):
        """(StepBatch, the outputs of the policy's forward ``requests``); ``cached``: the outputs are leaves computed
        without gradient (:func:`.microbatch.cached_forwards`)."""
        ro = buf["ro"]
        t0 = self._clock()
        outs = cached_forwards(self.forwards, self.policy, ro, requests, self._clock, timings) if cached \
            else self.forwards.run_all(self.policy, ro, requests, self._clock, timings)
        timings["policy_forward"] = self._clock() - t0 - sum(v for k, v in timings.items()
                                                             if k.endswith("_scored_rows"))
        logps, hidden, scored = self.forwards.assemble(requests, outs)
        step = StepBatch(ro.prompt_ids, ro.prompt_mask, ro.completion_ids, buf["mask"], ro.completion_mask,
                         buf["advantages"], logps, buf["layout"], old_logps=buf["old_logps"], ref_logps=buf["ref_logps"],
                         hidden=hidden, ref_hidden=buf["ref_hidden"],
                         principle_embeddings=self.principle_embeddings if self.needs.principle_embeddings else None,
                         scored=scored, num_items_in_batch=self._tokens_per_rank(buf["mask"]),
                         max_completion_length=self.sampling.max_new_tokens, step=self.global_step,
                         sampling_logps=ro.sampling_logps, sampling_exact=ro.exact_logps,
                         gather=gather_rows if self._distributed else None)
        forward = partial(self.forwards.forward, self.policy, ro, per_prompt=self.per_prompt)
        for name, term in self.terms.items():
            t0 = self._clock()
            if (prepared := term.prepare(forward, step)) is not None:
                step.prepared[name] = prepared
                timings[f"{name}_prepare"] = self._clock() - t0
        return step, outs

    def _rollout_metrics(self, buf: dict[str, Any]) -> dict[str, Any]:
        ro, rewards = buf["ro"], buf["rewards"]
        self.last_samples = sample_rows(self.global_step, buf["prompts"], ro.completions, buf["reward_list"],
                                        buf["columns"].get("target"), buf.get("extra"))[: self.num_samples_kept]
        return rollout_metrics(ro, rewards, buf["per_func"], buf["std_zero"], buf["advantages"], self.reward.names,
                               logged=getattr(self.reward, "last_logged", {}))

    # ---- optimiser -----------------------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith(FROZEN_PREFIXES)]

    def configure_optimizers(self):
        opt = self.optimizer_factory(self.trainable_parameters())
        if self.scheduler_factory is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.scheduler_factory(opt), "interval": "step"}}

    # ---- checkpoints: policy (and trainable term parameters) only, plus RNG state (:mod:`.checkpoint`) ---------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        strip_frozen(checkpoint)
        checkpoint["val_best"] = self.val_best

    def teardown(self, stage: str) -> None:
        self.engine.close()  # a later rollout starts it again

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        restore_frozen(checkpoint, self.state_dict())
        self.val_best = checkpoint.get("val_best")
