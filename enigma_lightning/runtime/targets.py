"""What a config may instantiate, and which keys a node may have.

Every ``_target_`` in a config must match :data:`ALLOWED` (the project's own objects and the named libraries'
optimisers, schedulers, Lightning's trainer pieces, peft's configs and TRL's reward functions) or a pattern the user
adds explicitly with ``allowed_targets=[mypackage.rewards]`` (a module name allows everything in it; ``*`` globs).
Config files read from a run folder (``evaluate``, ``probe``) are checked against :data:`ALLOWED` alone: a run folder
cannot widen it.

A node with a ``_target_`` may only hold keys its target takes (unless it takes ``**kwargs``): ``+optim.lr=1e-4``
or ``grpo.betaa=0.1`` is an error that names the key that exists.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

ALLOWED = (
    "enigma_lightning.*",
    "torch.optim.*",
    "lightning.pytorch.Trainer", "lightning.Trainer",
    "lightning.pytorch.callbacks.*", "lightning.pytorch.loggers.*", "lightning.pytorch.strategies.*",
    "lightning.pytorch.profilers.*", "lightning.pytorch.plugins.*",
    "transformers.get_*schedule*", "transformers.optimization.get_*schedule*",
    "peft.*Config",
    "trl.rewards.*",
)
# other trainers' names for our settings (TRL's GRPOConfig): the CLI maps them, a config file is told the name
OTHER_NAMES = {"max_completion_length": ("rollout.max_new_tokens", "TRL")}
HYDRA_KEYS = {"_target_", "_partial_", "_convert_", "_recursive_", "_args_"}
# config nodes without a _target_ whose keys are fixed
FIXED = {"optim": ("optimizer", "scheduler")}
TOP_LEVEL = ("paths", "model", "peft", "encoder", "data", "principles", "prompt", "step", "loss", "rollout", "reward",
             "optim", "trainer", "logger", "callbacks", "seed", "optimized_metric", "ckpt_path", "resume",
             "rerun_failed", "cpu_malloc", "module", "allowed_targets", "on_config_change", "tags",
             "claim_si")  # claim_si: experiment=si_claim's SI table (read after the sweep, not by training)


def _patterns(extra: list[str] | None) -> list[str]:
    out = list(ALLOWED)
    for p in extra or []:
        out += [str(p)] if "*" in str(p) else [str(p), f"{p}.*"]
    return out


def allowed(target: str, extra: list[str] | None = None) -> bool:
    return any(fnmatch.fnmatchcase(target, p) for p in _patterns(extra))


def walk(node: Any, path: str = ""):
    """(path, DictConfig) for every mapping in a config, without resolving interpolations."""
    if isinstance(node, DictConfig):
        yield path, node
        for k in node.keys():
            child = node._get_node(k)
            if isinstance(child, DictConfig | ListConfig):
                yield from walk(child, f"{path}.{k}" if path else str(k))
    elif isinstance(node, ListConfig):
        for i, child in enumerate(node._iter_ex(resolve=False)):
            yield from walk(child, f"{path}[{i}]")


def target_problems(cfg: DictConfig, extra: list[str] | None = None, where: str = "") -> list[str]:
    """One message per ``_target_`` outside the allow-list."""
    out = []
    for path, node in walk(cfg):
        t = node._get_node("_target_") if "_target_" in node else None
        target = None if t is None else t._value()
        if isinstance(target, str) and not allowed(target, extra):
            key = f"{path}._target_" if path else "_target_"
            out.append(f"{where}{key}={target} is not an allowed target (the project's own, torch.optim, Lightning's "
                       "trainer pieces, transformers' schedulers, peft's configs, TRL's rewards). If you trust it, allow it "
                       f"explicitly: allowed_targets=[{target}]")
    return out


def _params(target: str) -> tuple[set[str], bool] | None:
    """(parameter names, takes **kwargs) of a target, or None when it cannot be inspected."""
    from hydra.utils import get_object

    try:
        obj = get_object(target)
        sig = inspect.signature(obj)
    except Exception:
        return None
    names = {n for n, p in sig.parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    return names, any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())


def _leaf_paths(cfg: DictConfig) -> list[str]:
    out = []
    for path, node in walk(cfg):
        out += [f"{path}.{k}" if path else str(k) for k in node.keys()]
    return out


def _suggest(cfg: DictConfig, path: str, key: str, names: list[str]) -> str:
    close = difflib.get_close_matches(key, names, n=1)
    if close:
        return f" Did you mean {path}.{close[0]}?" if path else f" Did you mean {close[0]}?"
    elsewhere = [p for p in _leaf_paths(cfg) if p.endswith(f".{key}") and p != f"{path}.{key}"]
    if elsewhere:
        return f" The setting is {elsewhere[0]}: set {elsewhere[0]}=<value>."
    return f" Its settings: {', '.join(sorted(names))}." if names else ""


def unknown_key_problems(cfg: DictConfig, terms: list[str]) -> list[str]:
    """One message per key that no constructor takes (``+optim.lr``, ``grpo.betaa``)."""
    out = []
    fixed = {**FIXED, "": (*TOP_LEVEL, *terms)}
    for path, node in walk(cfg):
        if path.startswith(("module", "paths", "hydra")) or "[" in path:
            continue
        if path in fixed:
            names, takes_kwargs = set(fixed[path]), False
        elif "_target_" in node and isinstance(node._get_node("_target_")._value(), str):
            found = _params(node._get_node("_target_")._value())
            if found is None:
                continue
            names, takes_kwargs = found
        else:
            continue
        if takes_kwargs:
            continue
        for k in node.keys():
            k = str(k)
            if k in HYDRA_KEYS or k in names:
                continue
            full = f"{path}.{k}" if path else k
            if k in OTHER_NAMES:
                ours, who = OTHER_NAMES[k]
                value = node._get_node(k)._value()
                out.append(f"{full} is {who}'s name for {ours}; set {ours}={value} (and remove {full})")
                continue
            owner = node._get_node("_target_")._value() if "_target_" in node else path or "the top level"
            out.append(f"{full} is not a setting ({owner} takes no {k!r}).{_suggest(cfg, path, k, sorted(names))} "
                       f"Remove +{full}")
    return out


def check_run_config(run: DictConfig, where: str) -> list[str]:
    """Problems with a run folder's config before anything in it is instantiated: targets outside :data:`ALLOWED`
    (a run folder's own ``allowed_targets`` is ignored)."""
    return target_problems(run, None, where=where)


__all__ = ["ALLOWED", "allowed", "target_problems", "unknown_key_problems", "check_run_config", "OmegaConf"]
