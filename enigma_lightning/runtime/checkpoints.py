"""Load a trained policy for evaluation and probes: from a run's Lightning checkpoint or an exported folder.

``ckpt_path`` may be

- a Lightning checkpoint of a run (``<run>/checkpoints/last.ckpt``): the run's ``config.yaml`` (next to
  ``checkpoints/``) says which base model, LoRA adapter, prompt and principle set it was trained with; the policy's
  weights are loaded into that base (a LoRA adapter is merged);
- an exported policy folder (``<run>/policy``, written by ``save_pretrained``): loaded as a model folder, with the
  run's ``config.yaml`` found one level up when it is there.

Loading is safe with untrusted files: checkpoints are read with ``torch.load(weights_only=True)`` (tensors and plain
values only; a checkpoint that needs anything else is refused), the run folder's ``_target_`` entries must be the
project's own or the named libraries' (:mod:`.targets`; the folder's ``allowed_targets`` is ignored), and a run
folder's ``model.trust_remote_code=true`` is taken only when the command line says so too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ..errors import EnigmaError

RUN_KEYS = ("model", "peft", "prompt", "principles")


def run_config(ckpt_path: str) -> DictConfig | None:
    """The ``config.yaml`` of the run a checkpoint or policy folder belongs to, or None."""
    p = Path(ckpt_path).expanduser()
    for folder in (p.parent, p.parent.parent) if p.is_file() or is_sharded_checkpoint(p) else (p, p.parent):
        if (folder / "config.yaml").is_file():
            return OmegaConf.load(folder / "config.yaml")
    return None


def merge_run_config(cfg: DictConfig, key: str = "ckpt_path") -> DictConfig:
    """Take ``model``, ``peft``, ``prompt`` and ``principles`` from the checkpoint's run (``use_run_config=true``),
    so a checkpoint is evaluated under the prompt and principles it was trained with."""
    from .targets import target_problems

    if problems := target_problems(cfg, list(cfg.get("allowed_targets") or [])):
        from ..errors import ConfigError

        raise ConfigError(problems)
    ckpt = cfg.get(key)
    if not ckpt:
        return cfg
    p = Path(str(ckpt)).expanduser()
    if not p.exists():
        raise EnigmaError(f"{key}: {p} does not exist. Point it at <run dir>/checkpoints/last.ckpt or <run dir>/policy")
    run = run_config(str(p)) if cfg.get("use_run_config", True) else None
    if run is None:
        if p.is_file():
            raise EnigmaError(f"{key}: no config.yaml next to {p} (looked in {p.parent} and {p.parent.parent}), so "
                              "the base model is unknown. Pass a checkpoint inside its run folder, or the exported "
                              "<run dir>/policy folder as model=<folder>")
        return cfg
    from .targets import check_run_config

    folder = {k: run[k] for k in RUN_KEYS if k in run}
    if problems := check_run_config(OmegaConf.create(folder), where=f"{p.parent}: config.yaml: "):
        raise EnigmaError("the run folder's config names code that is not loaded from a run folder:\n  "
                          + "\n  ".join(problems) + f"\nOnly use run folders you trust; or set {key}'s model "
                          "yourself with use_run_config=false model=<base model>")
    asked = bool(OmegaConf.select(cfg, "model.trust_remote_code", default=False))
    if OmegaConf.select(run, "model.trust_remote_code", default=False) is True and not asked:
        raise EnigmaError(f"{key}: the run folder's config.yaml sets model.trust_remote_code=true (the model's own "
                          "Python code from the hub would run). If you trust that model, say so: "
                          "model.trust_remote_code=true; else use_run_config=false model=<base model>")
    merged = cfg.copy()
    OmegaConf.set_struct(merged, False)
    for k, v in folder.items():
        merged[k] = v
    return merged


def load_policy_from(cfg: DictConfig, key: str = "ckpt_path") -> tuple[torch.nn.Module, Any]:
    """(policy, tokenizer) for ``cfg[key]`` (see the module doc) or, when it is empty, the base ``cfg.model``."""
    from hydra.utils import instantiate

    from ..models.loading import apply_lora, load_policy, load_tokenizer

    spec = instantiate(cfg.model)
    ckpt = cfg.get(key)
    p = Path(str(ckpt)).expanduser() if ckpt else None
    if p is not None and p.is_dir() and not is_sharded_checkpoint(p):  # an exported policy folder
        if (p / "adapter_config.json").exists():
            from peft import AutoPeftModelForCausalLM

            from ..models.compat import peft_wrapping

            with peft_wrapping():
                model = AutoPeftModelForCausalLM.from_pretrained(str(p)).merge_and_unload()
        else:
            model = load_policy(_with_path(spec, str(p)))
        return model.eval(), load_tokenizer(_with_path(spec, str(p)))
    tok, model = load_tokenizer(spec), load_policy(spec)
    if p is None:
        return model.eval(), tok
    if cfg.get("peft"):
        model = apply_lora(model, instantiate(cfg.peft))
    state = load_checkpoint(p, key)
    sd = {k.removeprefix("policy."): v for k, v in state.get("state_dict", {}).items() if k.startswith("policy.")}
    if not sd:
        raise EnigmaError(f"{key}: {p} holds no policy weights (no 'policy.*' keys). Is it a checkpoint of an "
                          "enigma_lightning run?")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    missing = [k for k in missing if k.split("base_model.model.")[-1] not in tied]
    if missing or unexpected:
        raise EnigmaError(f"{key}: {p} does not match model.name_or_path={spec.name_or_path!r}: "
                          f"{len(missing)} missing keys (e.g. {missing[:2]}), {len(unexpected)} unexpected "
                          f"(e.g. {unexpected[:2]}). Set model= to the base model the run was trained from")
    if cfg.get("peft"):
        model = model.merge_and_unload()
    return model.eval(), tok


def is_sharded_checkpoint(p: Path) -> bool:
    """A sharded (DCP) checkpoint folder, as ``trainer=fsdp``/``fsdp_cpu`` write (``<name>.ckpt/.metadata``)."""
    return p.is_dir() and (p / ".metadata").is_file()


def load_checkpoint(p: Path, key: str = "ckpt_path") -> dict:
    """A Lightning checkpoint's contents, read with ``weights_only=True``: tensors and plain values, never code. A
    sharded (DCP) folder is first gathered into one file (``dcp_to_torch_save``) in a temporary folder."""
    import pickle

    if is_sharded_checkpoint(p):
        import tempfile

        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with tempfile.TemporaryDirectory() as tmp:
            dcp_to_torch_save(str(p), f"{tmp}/full.ckpt")
            return load_checkpoint(Path(tmp) / "full.ckpt", key)

    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = str(e).split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
        raise EnigmaError(f"{key}: {p} holds objects other than tensors and plain values ({detail}); loading them "
                          "could run code, so it is refused. Use a checkpoint written by enigma_lightning, or the "
                          "exported <run dir>/policy folder") from e
    except (RuntimeError, EOFError, OSError) as e:
        raise EnigmaError(f"{key}: {p} could not be read ({type(e).__name__}: {str(e).splitlines()[0]}); it may be "
                          "truncated. Use another checkpoint of the run (checkpoints/step*.ckpt)") from e


def _with_path(spec, path: str):
    import dataclasses

    return dataclasses.replace(spec, name_or_path=path)


def device_for(device: str) -> torch.device:
    """``auto``: CUDA when there is a GPU, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
