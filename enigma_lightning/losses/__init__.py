"""Loss terms. Each term is selected through the ``loss`` config group and configured by its own group
(``grpo``, later ``sami``, ``ot``); the module sums ``weight * loss`` over the selected terms."""

from .base import LossTerm, StepInputs
from .grpo import GRPOLoss, group_advantages, grpo_loss, nanstd

__all__ = ["LossTerm", "StepInputs", "GRPOLoss", "grpo_loss", "group_advantages", "nanstd"]
