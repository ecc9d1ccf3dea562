"""Rewards: functions called as TRL's ``GRPOTrainer`` calls them, ``f(prompts, completions, completion_ids,
trainer_state, **columns) -> list[float | None]`` (:mod:`.xml`: the format-gated XML chain-of-thought rewards;
TRL's own, e.g. ``trl.rewards.think_format_reward``, in the conversational form), verl's ``compute_score``
through :class:`VerlScore` (:mod:`.verl`), and :class:`RewardModel`, which combines them (:mod:`.combine` says what
each argument holds). Configs name them as ``enigma_lightning.rewards.<name>`` (``conf/reward/``)."""

from .combine import RewardModel, token_lists, trainer_state
from .verl import VerlScore, xml_compute_score
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

__all__ = ["RewardFn", "RewardModel", "VerlScore", "answers_match", "extract_answer", "format_score",
           "gated_correctness_reward", "is_strict", "strict_format_reward", "token_lists", "trainer_state", "xml_compute_score",
           "xml_format_reward"]
