"""Rewards: functions with TRL's signature ``f(prompts, completions, **columns) -> list[float | None]``
(:mod:`.xml`: the format-gated XML chain-of-thought rewards) and :class:`RewardModel`, which combines them.
Configs name them as ``enigma_lightning.rewards.<name>`` (``conf/reward/``)."""

from .combine import RewardModel
from .xml import (
    RewardFn,
    answers_match,
    extract_answer,
    format_score,
    gated_correctness_reward,
    is_strict,
    strict_format_reward,
    xml_format_reward,
)

__all__ = ["RewardFn", "RewardModel", "answers_match", "extract_answer", "format_score", "gated_correctness_reward",
           "is_strict", "strict_format_reward", "xml_format_reward"]
