"""Loss terms: pure tensor functions and the thin :class:`~.base.LossTerm` wrappers the step sums. A term is one
module here plus one YAML file in ``conf/loss/`` (the contract: :mod:`.base`)."""

from .base import Forward, Layout, LossTerm, Needs, ScoredRows, StepBatch
from .grpo import GRPOLoss, grpo_loss

__all__ = ["Forward", "GRPOLoss", "Layout", "LossTerm", "Needs", "ScoredRows", "StepBatch", "grpo_loss"]
