"""One check of the composed configuration that collects every problem and raises once (:class:`ConfigError`).

Each message names the key, what is wrong, and the override that fixes it.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from ..data.datasets import check_data_source
from ..data.principles import TARGET as PRINCIPLE_SET
from ..errors import ConfigError
from ..losses.grpo import IS_LEVELS, LOSS_TYPES
from ..losses.sami import CRITICS
from ..metrics.names import documented
from ..models.loading import is_local_path
from ..step.group import SCALE_REWARDS
from .allocator import MODES as CPU_MALLOC_MODES
from .ranges import cached_hub_config, range_problems
from .sweeps import CONFIG_CHANGE_MODES, RESUME_MODES
from .targets import target_problems, unknown_key_problems


def _get(cfg: DictConfig, key: str, default=None):
    value = OmegaConf.select(cfg, key, default=default, throw_on_missing=False)
    return value


def selected_terms(cfg: DictConfig) -> list[str]:
    """The loss terms ``loss`` selects (``loss.<name>: true``), in order."""
    loss = _get(cfg, "loss")
    return [str(k) for k, v in loss.items() if v] if isinstance(loss, DictConfig) else []


def principle_variant_count(cfg: DictConfig) -> int:
    """How many variants the selected principle set has (:meth:`PrincipleSet.all_variants`: its non-empty text,
    antithesis and variants), counted without building it (its problems are reported on their own)."""
    node = _get(cfg, "principles")
    if not isinstance(node, DictConfig):
        return 0
    variants = node.get("variants") if isinstance(node.get("variants"), ListConfig) else []
    return sum(isinstance(v, str) and bool(v.strip()) for v in [node.get("text"), node.get("antithesis"), *variants])


def principles_problems(cfg: DictConfig) -> list[str]:
    """The selected principle set (package, user or file: ``principles=/path/to/set.yaml``) builds a PrincipleSet,
    with a text and a list of variants."""
    choose = "Choose a set: principles=default (conf/principles/), one of yours, or principles=/path/to/set.yaml"
    node = _get(cfg, "principles")
    if not isinstance(node, DictConfig):
        return [f"principles is not a principle set; got {node!r}. {choose}"]
    p = []
    if node.get("_target_") != PRINCIPLE_SET:
        p.append(f"principles._target_ is {node.get('_target_')!r}; a principle set is built by {PRINCIPLE_SET}. "
                 f"Set principles._target_={PRINCIPLE_SET}")
    if not isinstance(node.get("text"), str) or not node.get("text").strip():
        p.append(f"principles.text is empty. {choose}")
    variants = node.get("variants", [])
    listed = isinstance(variants, ListConfig) and all(isinstance(v, str) for v in variants)
    if variants is not None and not listed:
        p.append(f"principles.variants must be a list of texts; got {variants!r}. Set principles.variants=[] or "
                 "write them in the set's file as a list (`variants:`, then `- |` and each text)")
    return p


def config_problems(cfg: DictConfig) -> list[str]:
    p: list[str] = []
    g = _get(cfg, "step.num_generations")
    if not isinstance(g, int) or g < 2:
        p.append(f"step.num_generations must be >= 2 for group-relative advantages; got {g}. Set step.num_generations=4")
    bs = _get(cfg, "data.batch_size")
    if isinstance(g, int) and g >= 2 and (not isinstance(bs, int) or bs < g or bs % g):
        fix = max(g, (bs or 0) // g * g) if isinstance(bs, int) else 4 * g
        p.append(f"data.batch_size counts completions per step and must be a positive multiple of "
                 f"step.num_generations={g}; got {bs}. Set data.batch_size={fix}")
    ni = _get(cfg, "step.num_iterations")
    if not isinstance(ni, int) or ni < 1:
        p.append(f"step.num_iterations must be >= 1; got {ni}. Set step.num_iterations=1")
    if _get(cfg, "step.scale_rewards") not in SCALE_REWARDS:
        p.append(f"step.scale_rewards must be one of {list(SCALE_REWARDS)}; got {_get(cfg, 'step.scale_rewards')!r}. "
                 "Set step.scale_rewards=group")

    loss = selected_terms(cfg)
    if not loss:
        p.append("loss selects no term. Choose a preset: loss=grpo (or loss=[grpo,<term>], loss=full)")
    elif "grpo" not in loss:
        p.append(f"loss must include the grpo term; got {loss}. Use loss=[grpo,{','.join(loss)}]")
    for name in loss:
        node = _get(cfg, name)
        if not isinstance(node, DictConfig) or "_target_" not in node:
            p.append(f"loss.{name} is selected but `{name}` has no _target_: a term's YAML (conf/loss/{name}.yaml) "
                     f"sets `loss.{name}: true` and its settings under `{name}:` with the term's _target_")

    if "grpo" in loss:
        for key, allowed in (("grpo.loss_type", LOSS_TYPES), ("grpo.importance_sampling_level", IS_LEVELS)):
            v = _get(cfg, key)
            if v not in allowed:
                p.append(f"{key} must be one of {list(allowed)}; got {v!r}. Set {key}={allowed[0]}")
        eps = _get(cfg, "grpo.epsilon")
        if not isinstance(eps, int | float) or eps <= 0:
            p.append(f"grpo.epsilon (clip range) must be > 0; got {eps}. Set grpo.epsilon=0.2")
        eh = _get(cfg, "grpo.epsilon_high")
        if eh is not None and (not isinstance(eh, int | float) or eh <= 0):
            p.append(f"grpo.epsilon_high must be > 0 or null (= grpo.epsilon); got {eh}. Set grpo.epsilon_high=null")

    if "sami" in loss:
        k = _get(cfg, "sami.num_variants")
        available = principle_variant_count(cfg)
        if not isinstance(k, int) or k < 2:
            p.append(f"sami.num_variants must be >= 2 (InfoNCE contrasts variants); got {k}. Set sami.num_variants=2")
        elif k > available:
            p.append(f"sami.num_variants={k} but principles={_get(cfg, 'principles.name')} has {available} variants "
                     f"(text, antithesis, variants). Set sami.num_variants={available} or add principles.variants")
        elif isinstance(g, int) and g % k:
            p.append(f"step.num_generations={g} must be a multiple of sami.num_variants={k} (each variant gets "
                     f"G / K completions). Set step.num_generations={max(k, g // k * k)}")
        if _get(cfg, "sami.critic") not in CRITICS:
            p.append(f"sami.critic must be one of {list(CRITICS)}; got {_get(cfg, 'sami.critic')!r}. "
                     "Set sami.critic=logprob")
        elif _get(cfg, "sami.critic") == "encoder" and not _get(cfg, "encoder"):
            p.append("sami.critic=encoder needs the principle encoder. Set encoder=minilm or sami.critic=logprob")

    t = _get(cfg, "rollout.temperature")
    if not isinstance(t, int | float) or t <= 0:
        p.append(f"rollout.temperature must be > 0 (GRPO samples); got {t}. Set rollout.temperature=0.9")
    mnt = _get(cfg, "rollout.max_new_tokens")
    if not isinstance(mnt, int) or mnt < 1:
        p.append(f"rollout.max_new_tokens must be >= 1; got {mnt}. Set rollout.max_new_tokens=96")
    tp = _get(cfg, "rollout.top_p")
    if not isinstance(tp, int | float) or not 0 < tp <= 1:
        p.append(f"rollout.top_p must be in (0, 1]; got {tp}. Set rollout.top_p=1.0")

    data_path = _get(cfg, "data.path")
    problem = check_data_source(str(data_path)) if data_path else "data.path is empty. Set data.path=bundled"
    if problem:
        p.append(problem)
    if _get(cfg, "data.val_path") and (vp := check_data_source(str(_get(cfg, "data.val_path")))):
        p.append(vp.replace("data.path", "data.val_path"))
    if _get(cfg, "data.on_bad_rows") not in ("error", "skip"):
        p.append(f"data.on_bad_rows must be error or skip; got {_get(cfg, 'data.on_bad_rows')!r}")

    name = str(_get(cfg, "model.name_or_path", ""))
    if not name:
        p.append("model.name_or_path is empty. Set model=<hub id or local folder> or model=smollm2_embedded")
    elif is_local_path(name) and not Path(name).expanduser().exists():
        p.append(f"model.name_or_path: folder {name!r} does not exist. Point it at a saved checkpoint folder or a hub id")

    if _get(cfg, "resume", "auto") not in RESUME_MODES:
        p.append(f"resume must be auto or never; got {_get(cfg, 'resume')!r}. Set resume=auto")
    if _get(cfg, "cpu_malloc", "reuse") not in CPU_MALLOC_MODES:
        p.append(f"cpu_malloc must be {' or '.join(CPU_MALLOC_MODES)}; got {_get(cfg, 'cpu_malloc')!r}. "
                 f"Set cpu_malloc={CPU_MALLOC_MODES[0]}")
    ckpt = _get(cfg, "ckpt_path")
    if ckpt and not Path(str(ckpt)).expanduser().exists():
        p.append(f"ckpt_path: file {ckpt!r} does not exist. Use <run dir>/checkpoints/last.ckpt, or ckpt_path=null")

    ms = _get(cfg, "trainer.max_steps")
    if not isinstance(ms, int) or ms < 1:
        p.append(f"trainer.max_steps must be >= 1 (training is counted in GRPO steps); got {ms}. Set trainer.max_steps=20")
    if _get(cfg, "trainer.gradient_clip_val") is not None:
        p.append(f"trainer.gradient_clip_val={_get(cfg, 'trainer.gradient_clip_val')}: the step clips the gradient "
                 "itself (it may run in micro-batches). Set step.max_grad_norm=<value> and trainer.gradient_clip_val=null")
    acc = _get(cfg, "trainer.accumulate_grad_batches", 1)
    if acc != 1:
        p.append(f"trainer.accumulate_grad_batches must be 1 (one GRPO step = one rollout = one optimiser step); "
                 f"got {acc}. Raise data.batch_size instead; to bound memory set step.micro_batch_size")

    funcs, weights = _get(cfg, "reward.funcs"), _get(cfg, "reward.weights")
    if not funcs:
        p.append("reward.funcs is empty. Use reward=format_gated or add reward.funcs.<name>._target_=<module.fn>")
    elif weights:
        for k in set(weights) - set(funcs):
            p.append(f"reward.weights.{k} has no matching reward.funcs.{k}. Remove it or add the function")

    om = _get(cfg, "optimized_metric")
    if om is not None and not documented(str(om)):
        p.append(f"optimized_metric={om} is not a metric a run logs (docs/metrics.md). Set optimized_metric="
                 "val/accuracy_best, or optimized_metric=null")
    tags = _get(cfg, "tags")
    if tags is not None and (not isinstance(tags, ListConfig) or not all(isinstance(t, str) for t in tags)):
        p.append(f"tags must be a list of words; got {tags!r}. Set tags=[baseline,qwen] (or tags=[])")
    p += principles_problems(cfg)
    if _get(cfg, "on_config_change", "refuse") not in CONFIG_CHANGE_MODES:
        p.append(f"on_config_change must be {' or '.join(CONFIG_CHANGE_MODES)}; got {_get(cfg, 'on_config_change')!r}. "
                 "Set on_config_change=refuse")
    extra = _get(cfg, "allowed_targets") or []
    p += range_problems(cfg, loss) + unknown_key_problems(cfg, loss) + target_problems(cfg, list(extra))
    return p + hub_problems(cfg) + device_problems(cfg)


def hub_problems(cfg: DictConfig) -> list[str]:
    """Hub ids that cannot be loaded: offline (HF_HUB_OFFLINE=1) and not in the local cache."""
    import os

    if os.environ.get("HF_HUB_OFFLINE") != "1":
        return []
    out = []
    for key in ("model.name_or_path", "encoder.name_or_path"):
        name = str(_get(cfg, key, "") or "")
        if not name or name.startswith(("embedded:", "tiny:")) or is_local_path(name) or name.count("/") > 1:
            continue
        if cached_hub_config(name, _get(cfg, key.replace("name_or_path", "revision"))) is None:
            out.append(f"{key}={name!r} is a hub id, but HF_HUB_OFFLINE=1 and it is not in the local hub cache. "
                       f"Either point {key} at a local folder holding the model, or allow the network "
                       "(unset HF_HUB_OFFLINE) so it can be downloaded")
    return out


FSDP_PRECISIONS = ("32-true", "32", "bf16-mixed", "bf16-true", "16-true")  # what ModelParallelStrategy accepts


def _is_fsdp(strategy) -> bool:
    target = str(strategy.get("_target_", "")) if isinstance(strategy, DictConfig) else str(strategy or "")
    return "fsdp" in target.lower() or "fullysharded" in target.lower()


def device_problems(cfg: DictConfig) -> list[str]:
    """Trainer presets that need a GPU, on a machine without one; precisions FSDP does not take."""
    import torch

    strategy = _get(cfg, "trainer.strategy")
    p = []
    precision = str(_get(cfg, "trainer.precision", "32-true"))
    if _is_fsdp(strategy) and precision not in FSDP_PRECISIONS:
        p.append(f"trainer.precision={precision} is not supported under FSDP (Lightning's ModelParallelStrategy takes "
                 f"{', '.join(x for x in FSDP_PRECISIONS if x != '32')}). Set trainer.precision=bf16-mixed on GPU, or 32-true with "
                 "model.dtype=float64 for a float64 run")
    if _get(cfg, "trainer.accelerator") not in ("gpu", "cuda") or torch.cuda.is_available():
        return p
    if _is_fsdp(strategy):
        return p + ["trainer=fsdp (FSDP2 on CUDA GPUs) needs a CUDA GPU, and this machine has none "
                    "(torch.cuda.is_available() is False). Use trainer=fsdp_cpu (FSDP2 on two CPU processes), "
                    "trainer=cpu (one process) or trainer=ddp_cpu (two CPU processes)"]
    preset = f"trainer.accelerator={_get(cfg, 'trainer.accelerator')} ({'trainer=ddp' if strategy else 'trainer=gpu'})"
    return p + [f"{preset} needs a CUDA GPU, and this machine has none (torch.cuda.is_available() is False). "
                "Use trainer=cpu (one process) or trainer=ddp_cpu (two CPU processes)"]


def validate(cfg: DictConfig) -> None:
    problems = config_problems(cfg)
    if problems:
        raise ConfigError(problems)
