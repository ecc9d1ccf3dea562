"""Rewards on crafted completions: valid, trailing junk, repeated blocks, wrong answer in a valid format."""

import math

import pytest

from enigma_lightning.data.prompts import format_completion
from enigma_lightning.rewards import (
    RewardModel,
    answers_match,
    extract_answer,
    format_score,
    gated_correctness_reward,
    is_strict,
    strict_format_reward,
    xml_format_reward,
)

VALID = "<reasoning>\n12 + 7 = 19\n</reasoning>\n<answer>\n19\n</answer>"
TRAILING = VALID + "\nHope this helps!"
REPEATED = VALID + "\n" + VALID
PREFIXED = "Sure! " + VALID
OUT_OF_ORDER = "<answer>\n19\n</answer>\n<reasoning>\n12 + 7 = 19\n</reasoning>"
NO_TAGS = "The answer is 19."
NESTED = "<reasoning>\n<answer>1</answer>\n</reasoning>\n<answer>\n19\n</answer>"


def test_strict_format():
    assert is_strict(VALID)
    assert is_strict("<reasoning>a</reasoning><answer>b</answer>")
    assert is_strict(format_completion("x = 1", "1"))
    for bad in (TRAILING, REPEATED, PREFIXED, OUT_OF_ORDER, NO_TAGS, NESTED):
        assert not is_strict(bad), bad


def test_format_scores_rank_completions():
    assert format_score(VALID) == 1.0
    assert format_score(TRAILING) == 0.75  # tags once and in order, but text after </answer>
    assert format_score(PREFIXED) == 0.75
    assert format_score(OUT_OF_ORDER) == 0.5  # tags once, wrong order
    assert format_score(REPEATED) == 0.0  # every tag twice: no credit
    assert format_score(NO_TAGS) == 0.0
    assert format_score("<reasoning>\nthinking") == 0.125
    assert format_score(VALID) > format_score(TRAILING) > format_score(OUT_OF_ORDER) > format_score(REPEATED)


def test_gated_correctness():
    wrong = VALID.replace("\n19\n</answer>", "\n20\n</answer>")
    comps = [VALID, wrong, TRAILING, REPEATED]
    assert gated_correctness_reward(None, comps, target=["19"] * 4) == [1.0, 0.0, 0.0, 0.0]
    assert gated_correctness_reward(None, [VALID], target=[None]) == [None]
    assert gated_correctness_reward(None, [VALID]) == [None]


def test_answer_extraction_and_matching():
    assert extract_answer(VALID) == "19"
    assert extract_answer(NO_TAGS) is None
    assert answers_match("19", "19") and answers_match("19 apples", "19") and answers_match("1,200", "1200")
    assert not answers_match("190", "19") and not answers_match(None, "19")
    assert answers_match("Paris.", "paris") and not answers_match("Lyon", "Paris")


def test_trl_signature_and_reward_model():
    prompts = ["p"] * 3
    comps = [VALID, TRAILING, NO_TAGS]
    assert xml_format_reward(prompts, comps) == [1.0, 0.75, 0.0]
    assert strict_format_reward(prompts=prompts, completions=comps) == [1.0, 0.0, 0.0]
    rm = RewardModel({"format": xml_format_reward, "correctness": gated_correctness_reward},
                     {"format": 1.0, "correctness": 2.0}, conversational=[])
    per_func, total = rm(prompts, comps, target=["19", "19", "19"])
    assert per_func.tolist() == [[1.0, 1.0], [0.75, 0.0], [0.0, 0.0]]
    assert total.tolist() == [3.0, 0.75, 0.0]
    _, total = rm(prompts, comps, target=[None, None, None])
    assert total.tolist() == [1.0, 0.75, 0.0]  # None is skipped, not counted as 0


def test_all_none_is_unscorable():
    rm = RewardModel({"c": gated_correctness_reward}, conversational=[])
    _, total = rm(["p"], [VALID], target=[None])
    assert math.isnan(total[0])


def test_reward_model_rejects_unknown_weight():
    with pytest.raises(ValueError, match="reward.weights"):
        RewardModel({"format": xml_format_reward}, {"fromat": 1.0}, conversational=[])
