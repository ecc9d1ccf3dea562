"""enigma-lightning: ENIGMA (GRPO + SAMI InfoNCE + Sinkhorn OT) on PyTorch Lightning with Hydra."""

__version__ = "0.1.0"

from .runtime.resolvers import register as _register_resolvers

_register_resolvers()
