"""What a checkpoint holds beyond Lightning's own: the policy (and trainable term parameters) only, never the frozen
reference or the principle encoder (they are rebuilt from their sources), plus the RNG state, so a resumed run
samples what the uninterrupted run sampled."""

from __future__ import annotations

import random
from typing import Any

import torch

FROZEN_PREFIXES = ("reference.", "encoder.")


def strip_frozen(checkpoint: dict[str, Any]) -> None:
    """Drop the frozen modules' weights from ``checkpoint["state_dict"]`` and add the RNG state."""
    sd = checkpoint["state_dict"]
    for k in [k for k in sd if k.startswith(FROZEN_PREFIXES)]:
        del sd[k]
    checkpoint["rng"] = {"torch": torch.get_rng_state(), "python": random.getstate(),
                         "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def restore_frozen(checkpoint: dict[str, Any], current: dict[str, torch.Tensor]) -> None:
    """Put the frozen modules' current weights (``current``: the module's state dict) back into the checkpoint's state
    dict before Lightning loads it, and restore the RNG state. A sharded (FSDP2) checkpoint's weights are loaded by the
    strategy before this hook, and it passes no ``state_dict``: the frozen modules are not in it (:mod:`.sharding`)."""
    sd = checkpoint.get("state_dict")
    for k, v in current.items() if sd is not None else ():
        if k.startswith(FROZEN_PREFIXES):
            sd[k] = v
    rng = checkpoint.get("rng")
    if rng:
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
