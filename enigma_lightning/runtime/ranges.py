"""The range of every numeric and enumerated setting, in one table: :func:`range_problems` checks a composed config
against it and returns one message per bad value, naming the key, the value and the override that fixes it.

A rule is ``(key, allowed, fix, when)``: ``allowed`` an :class:`Allowed` (a number range, a list of choices, a
boolean), ``fix`` the value the message suggests, ``when`` a loss term that must be selected (``grpo``, ``sami``,
``ot``), a top-level key that must be set (``encoder``, ``callbacks.probes``), or None (always). Keys absent from the
config are not checked (an optimiser without ``betas``, a scheduler without ``num_warmup_steps``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from ..losses.base import hidden_states_text, layer_exists
from ..losses.ot import NORMALIZATIONS, POOLINGS

_MISSING = object()


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class Allowed:
    """A number range (``lo``/``hi``, open or closed, integers only with ``integer``), a set of ``choices``, or a
    boolean (``boolean``); ``null`` also allows None; ``also`` is another :class:`Allowed` a value may satisfy."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    integer: bool = False
    choices: tuple = ()
    boolean: bool = False
    null: bool = False
    also: Allowed | None = None

    def ok(self, v: Any) -> bool:
        if v is None:
            return self.null
        if self.also is not None and self.also.ok(v):
            return True
        if self.boolean:
            return isinstance(v, bool)
        if self.choices:
            return v in self.choices and not (isinstance(v, bool) and True not in self.choices)
        if not _is_number(v) or (self.integer and not isinstance(v, int)):
            return False
        if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
            return False
        return not (self.hi is not None and (v > self.hi or (self.hi_open and v == self.hi)))

    def text(self) -> str:
        if self.boolean:
            out = "true or false"
        elif self.choices:
            out = "one of " + ", ".join(str(c) for c in self.choices)
        else:
            kind = "an integer" if self.integer else "a number"
            if self.lo is not None and self.hi is not None:
                out = f"{kind} in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
            elif self.lo is not None:
                out = f"{kind} {'>' if self.lo_open else '>='} {self.lo:g}"
            else:
                out = kind
        if self.also is not None:
            out += f", or {self.also.text()}"
        return out + (", or null" if self.null else "")


def gt(x, **kw) -> Allowed:
    return Allowed(lo=x, lo_open=True, **kw)


def ge(x, **kw) -> Allowed:
    return Allowed(lo=x, **kw)


def one_of(*choices, **kw) -> Allowed:
    return Allowed(choices=choices, **kw)


BOOL = Allowed(boolean=True)
INT = Allowed(integer=True)
PRECISIONS = ("32-true", "32", "64-true", "64", "16-mixed", "16", "bf16-mixed", "bf16", "bf16-true", "16-true",
              "transformer-engine")

RULES: list[tuple[str, Allowed, Any, str | None]] = [
    ("seed", ge(0, integer=True), 0, None),
    ("step.mask_truncated_completions", BOOL, "false", None),
    ("step.micro_batch_size", ge(1, integer=True, null=True), "null", None),
    ("step.max_grad_norm", gt(0, null=True), 1.0, None),
    # terms
    ("grpo.weight", ge(0), 1.0, "grpo"),
    ("grpo.beta", ge(0), 0.0, "grpo"),
    ("grpo.kl_bias_correction", BOOL, "true", "grpo"),
    ("grpo.rollout_correction", one_of("auto", "tis", "none"), "auto", "grpo"),
    ("grpo.rollout_correction_cap", Allowed(lo=1), 2.0, "grpo"),
    ("sami.weight", ge(0), 0.1, "sami"),
    ("sami.temperature", gt(0), 0.1, "sami"),
    ("sami.layer", INT, -1, "sami"),
    ("sami.negatives_grad", BOOL, "true", "sami"),
    ("ot.weight", ge(0), 10.0, "ot"),
    ("ot.epsilon", gt(0), 0.05, "ot"),
    ("ot.p", one_of(1, 2), 2, "ot"),
    ("ot.scaling", Allowed(lo=0, hi=1, lo_open=True, hi_open=True), 0.9, "ot"),
    ("ot.debias", BOOL, "true", "ot"),
    ("ot.pooling", one_of(*POOLINGS), POOLINGS[0], "ot"),
    ("ot.normalize", one_of(*NORMALIZATIONS), NORMALIZATIONS[0], "ot"),
    ("ot.max_points", ge(1, integer=True), 1024, "ot"),
    ("ot.backend", one_of("tensorized", "online"), "tensorized", "ot"),
    # rollout
    ("rollout.min_new_tokens", ge(0, integer=True), 0, None),
    ("rollout.top_k", ge(0, integer=True), 0, None),
    ("rollout.repetition_penalty", gt(0), 1.0, None),
    ("rollout.max_prompt_length", ge(1, integer=True, null=True), 1024, None),
    ("rollout.long_prompts", one_of("left", "error"), "left", None),
    ("rollout.seed_per_prompt", BOOL, "false", None),
    ("rollout.reserve_cache", BOOL, "true", None),
    ("rollout.share_prompts", BOOL, "true", None),
    # rollout/engine=vllm (absent keys, as with engine=hf, are not checked)
    ("rollout.engine.dtype", one_of("auto", "float32", "bfloat16", "float16"), "auto", None),
    ("rollout.engine.max_model_len", ge(1, integer=True, null=True), "null", None),
    ("rollout.engine.enable_prefix_caching", BOOL, "true", None),
    ("rollout.engine.gpu_memory_utilization", Allowed(lo=0, hi=1, lo_open=True), 0.3, None),
    ("rollout.engine.enable_sleep_mode", BOOL, "false", None),
    ("rollout.engine.tensor_parallel_size", ge(1, integer=True), 1, None),
    ("rollout.engine.kv_cache_gib", gt(0), 2.0, None),
    ("rollout.engine.enforce_eager", Allowed(boolean=True, null=True), "null", None),
    ("rollout.engine.max_num_seqs", ge(1, integer=True, null=True), "null", None),
    # data
    ("data.val_size", ge(0, integer=True), 32, None),
    ("data.val_batch_size", ge(1, integer=True), 16, None),
    ("data.limit", ge(1, integer=True, null=True), "null", None),
    ("data.num_workers", ge(0, integer=True), 0, None),
    # optimiser
    ("optim.optimizer.lr", gt(0), 3.0e-5, None),
    ("optim.optimizer.weight_decay", ge(0), 0.0, None),
    ("optim.optimizer.eps", gt(0), 1.0e-8, None),
    ("optim.optimizer.momentum", ge(0), 0.0, None),
    ("optim.scheduler.num_warmup_steps", ge(0, integer=True), 10, None),
    # model and encoder
    ("model.dtype", one_of("float32", "float64", "bfloat16", "float16", "auto"), "float32", None),
    ("model.gradient_checkpointing", BOOL, "true", None),
    ("model.checkpoint_every_n_layers", ge(1, integer=True), 1, None),
    ("model.trust_remote_code", BOOL, "false", None),
    ("encoder.max_length", ge(1, integer=True), 256, "encoder"),
    # trainer
    ("trainer.log_every_n_steps", ge(1, integer=True), 1, None),
    ("trainer.val_check_interval", ge(1, integer=True, also=Allowed(lo=0, hi=1, lo_open=True)), 10, None),
    ("trainer.limit_val_batches", ge(0, integer=True, also=Allowed(lo=0, hi=1)), 1.0, None),
    ("trainer.precision", one_of(*PRECISIONS), "32-true", None),
    ("trainer.num_sanity_val_steps", ge(-1, integer=True), 0, None),
    # callbacks and loggers
    ("callbacks.checkpoint.every_n_train_steps", ge(1, integer=True), 10, "callbacks.checkpoint"),
    ("callbacks.checkpoint.save_top_k", ge(-1, integer=True), 1, "callbacks.checkpoint"),
    ("callbacks.samples.every_n_steps", ge(1, integer=True), 5, "callbacks.samples"),
    ("callbacks.probes.every_n_steps", ge(1, integer=True), 10, "callbacks.probes"),
    ("callbacks.probes.num_questions", ge(1, integer=True), 8, "callbacks.probes"),
    ("callbacks.probes.epsilon", gt(0), 0.05, "callbacks.probes"),
    ("callbacks.probes.max_points", ge(1, integer=True), 512, "callbacks.probes"),
    ("logger.wandb.mode", one_of("auto", "online", "offline"), "auto", "logger.wandb"),
    ("callbacks.guard.on_nonfinite", one_of("stop", "skip"), "stop", "callbacks.guard"),
]

# hidden-state layers of presets whose config is not on disk before the model loads (hidden_states has n + 1)
KNOWN_LAYERS = {"embedded:smollm2-135m-instruct": 30}


def _value(cfg: DictConfig, key: str) -> Any:
    v = OmegaConf.select(cfg, key, default=_MISSING, throw_on_missing=False)
    return OmegaConf.to_container(v, resolve=True) if isinstance(v, DictConfig | ListConfig) else v


def _active(cfg: DictConfig, when: str | None, terms: list[str]) -> bool:
    if when is None:
        return True
    if when in ("grpo", "sami", "ot"):
        return when in terms
    return bool(OmegaConf.select(cfg, when, default=None))


def cached_hub_config(name: str, revision: str | None):
    """A hub id's config.json in the local hub cache (never downloads), or None (not cached, or not a hub id)."""
    from pathlib import Path

    if not name or name.startswith(("embedded:", "tiny:", "/", ".", "~")) or name.count("/") > 1:
        return None
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(name, "config.json", revision=revision or None)
    except Exception:  # not a valid repo id
        return None
    return Path(cached) if isinstance(cached, str) else None


def num_layers(cfg: DictConfig) -> int | None:
    """The policy's decoder layers when they are known before it loads (tiny, a local folder, a known preset, a hub
    id whose config is in the local hub cache); otherwise the step checks them once the policy has loaded."""
    import json
    from pathlib import Path

    name = str(OmegaConf.select(cfg, "model.name_or_path", default="") or "")
    if name.startswith("tiny:"):
        return int(OmegaConf.select(cfg, "model.tiny.num_layers", default=2) or 2)
    if name in KNOWN_LAYERS:
        return KNOWN_LAYERS[name]
    config = Path(name).expanduser() / "config.json"
    if name and not config.is_file():
        config = cached_hub_config(name, OmegaConf.select(cfg, "model.revision", default=None)) or config
    if name and config.is_file():
        data = json.loads(config.read_text())
        n = data.get("num_hidden_layers", data.get("text_config", {}).get("num_hidden_layers"))
        return int(n) if isinstance(n, int) else None
    return None


def layer_problems(cfg: DictConfig, terms: list[str]) -> list[str]:
    n = num_layers(cfg)
    out = []
    for key, when in (("ot.layers", "ot"), ("sami.layer", "sami")):
        if when not in terms or (key == "sami.layer" and _value(cfg, "sami.critic") != "encoder"):
            continue
        v = _value(cfg, key)
        layers = v if isinstance(v, list) else [v]
        if key == "ot.layers" and (not layers or not isinstance(v, list)):
            out.append(f"ot.layers must be a non-empty list of hidden-state layers; got {v!r}. Set ot.layers=[-1]")
            continue
        bad = [x for x in layers if not isinstance(x, int) or isinstance(x, bool)
               or (n is not None and not layer_exists(x, n))]
        if bad:
            span = f": the policy has {hidden_states_text(n)}" if n else " (integers)"
            fix = "[-1]" if key == "ot.layers" else "-1"
            out.append(f"{key}={v} names layers {bad} that do not exist{span}. Set {key}={fix}")
    return out


def engine_problems(cfg: DictConfig) -> list[str]:
    """rollout/engine=vllm: vLLM installed, and a max_model_len that holds a prompt and its completion."""
    target = _value(cfg, "rollout.engine._target_")
    if not isinstance(target, str) or not target.endswith("VLLMEngine"):
        return []
    from ..rollout.vllm import INSTALL, installed

    out = [] if installed() else [f"rollout/engine=vllm: vLLM is not installed; {INSTALL}"]
    limit, prompt, new = (_value(cfg, k) for k in ("rollout.engine.max_model_len", "rollout.max_prompt_length",
                                                    "rollout.max_new_tokens"))
    if isinstance(limit, int) and isinstance(prompt, int) and isinstance(new, int) and limit < prompt + new:
        out.append(f"rollout.engine.max_model_len={limit} cannot hold a prompt of rollout.max_prompt_length={prompt} "
                   f"tokens and rollout.max_new_tokens={new}. Set rollout.engine.max_model_len={prompt + new} (or "
                   "null), or lower the other two")
    return out


def range_problems(cfg: DictConfig, terms: list[str]) -> list[str]:
    """One message per value outside its range (see :data:`RULES`)."""
    out = []
    for key, allowed, fix, when in RULES:
        if not _active(cfg, when, terms):
            continue
        v = _value(cfg, key)
        if v is _MISSING or allowed.ok(v) or (key == "trainer.val_check_interval"
                                              and v == _value(cfg, "trainer.max_steps")):  # reported there
            continue
        out.append(f"{key} must be {allowed.text()}; got {v!r}. Set {key}={fix}")
    betas = _value(cfg, "optim.optimizer.betas")
    if betas is not _MISSING and not (isinstance(betas, list) and len(betas) == 2
                                      and all(_is_number(b) and 0 <= b < 1 for b in betas)):
        out.append(f"optim.optimizer.betas must be two numbers in [0, 1); got {betas!r}. "
                   "Set optim.optimizer.betas=[0.9,0.99]")
    mnt, mn = _value(cfg, "rollout.max_new_tokens"), _value(cfg, "rollout.min_new_tokens")
    if isinstance(mnt, int) and isinstance(mn, int) and mn > mnt:
        out.append(f"rollout.min_new_tokens={mn} is more than rollout.max_new_tokens={mnt}. "
                   f"Set rollout.min_new_tokens={mnt} or lower")
    out += engine_problems(cfg)
    weights = _value(cfg, "reward.weights")
    for name, w in (weights.items() if isinstance(weights, dict) else ()):
        if not _is_number(w) or w < 0:
            out.append(f"reward.weights.{name} must be a number >= 0; got {w!r}. Set reward.weights.{name}=1.0 "
                       "(to penalise, let the function return negative values)")
    if "ot" in terms and _value(cfg, "ot.backend") == "online":
        import importlib.util

        if importlib.util.find_spec("pykeops") is None:
            out.append("ot.backend=online needs pykeops, which is not installed. pip install pykeops, or set "
                       "ot.backend=tensorized")
    return out + layer_problems(cfg, terms)
