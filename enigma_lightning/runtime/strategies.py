"""Strategy factories for configs (FSDP needs a wrap policy, which YAML cannot express directly)."""

from __future__ import annotations

import functools
from typing import Any


def fsdp_strategy(wrap_classes: list[str], **kwargs: Any):
    """Lightning FSDPStrategy wrapping every module whose class name is in ``wrap_classes`` (transformer blocks)."""
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

    names = set(wrap_classes)
    policy = functools.partial(lambda_auto_wrap_policy, lambda_fn=lambda m: type(m).__name__ in names)
    return FSDPStrategy(auto_wrap_policy=policy, **kwargs)
