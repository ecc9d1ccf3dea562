"""FSDP2 sharding of the module's models (``trainer=fsdp``, ``trainer=fsdp_cpu``), applied in ``configure_model``.

Every module whose class (or a base class: ``fully_shard`` renames a class to ``FSDP<Name>``) is named in a model's
``_no_split_modules`` becomes one FSDP unit, then the root: the inner transformers model under PEFT, because
``PeftModel.generate`` calls it directly and the root's hook must gather the embeddings and head. Nothing depends on
a list of class names kept here.

The frozen reference is sharded too, with its root resharded after each forward (it never runs the backward that
would reshard it), so no rank holds a second full copy. The reference and the encoder are kept out of the module's
registered children: a sharded (DCP) checkpoint loads into the module's whole state dict, so frozen weights in it
could not be stripped from the checkpoint; they are rebuilt from their sources instead.
"""

from __future__ import annotations

import torch
from torch import nn


def block_classes(model: nn.Module) -> tuple[type, ...]:
    """The classes named by any submodule's ``_no_split_modules`` (matched along each class's MRO)."""
    names: set[str] = set()
    for m in model.modules():
        names |= set(getattr(m, "_no_split_modules", None) or [])
    classes = tuple({c for m in model.modules() for c in type(m).__mro__ if c.__name__ in names})
    if not classes:
        raise ValueError(f"{type(model).__name__} declares no _no_split_modules found among its modules "
                         f"({sorted(names)}), so FSDP cannot tell its transformer blocks. Use trainer=ddp")
    return classes


def is_fully_sharded(model: nn.Module | None) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return model is not None and any(isinstance(m, FSDPModule) for m in model.modules())


def shard(model: nn.Module, mesh, frozen: bool = False) -> nn.Module:
    """``fully_shard`` each transformer block, then the root (in place)."""
    from torch.distributed.fsdp import fully_shard

    classes = block_classes(model)
    for block in [m for m in model.modules() if isinstance(m, classes)]:  # listed first: fully_shard swaps classes
        fully_shard(block, mesh=mesh)
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    fully_shard(root, mesh=mesh, reshard_after_forward=True if frozen else None)
    return model


def shard_trainable(module: nn.Module, mesh) -> None:
    """``fully_shard`` every submodule that holds trainable parameters of its own (a loss term's projection): their
    gradients are then averaged across ranks like the policy's, and every trainable parameter is a DTensor."""
    from torch.distributed.fsdp import fully_shard

    owners = [m for m in module.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]
    for m in owners:
        fully_shard(m, mesh=mesh)


def unregister(module: nn.Module, name: str) -> None:
    """Keep ``module.<name>`` as a plain attribute, out of ``state_dict``, ``parameters`` and checkpoints."""
    child = module._modules.pop(name, None)
    if child is not None:
        object.__setattr__(module, name, child)


def grad_norm(params) -> torch.Tensor:
    """The gradients' global L2 norm (a plain tensor also when they are DTensors)."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    n = torch.nn.utils.get_total_norm(grads)
    return n.full_tensor() if isinstance(n, DTensor) else n
