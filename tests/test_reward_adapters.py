"""Reward functions written for other trainers plug in unchanged, configured as a user would: TRL's own
``think_format_reward`` and a TRL-style function that reads TRL's keyword arguments, and a verl ``compute_score``."""

import csv
import json

import pytest
from hydra.utils import instantiate

from enigma_lightning.data.prompts import format_completion

pytest.importorskip("trl")

VALID = format_completion("12 + 7 = 19", "19")
THINK = "<think>\nadd them\n</think>\n19"

SEEN: list[dict] = []  # what user_reward was called with, one entry per call


def user_reward(prompts, completions, completion_ids, trainer_state, log_metric, log_extra, target, **kwargs):
    """A TRL user's reward: conversational completions, token ids, the trainer's state, a dataset column; it reports a
    scalar (log_metric) and a column with one value per completion (log_extra)."""
    SEEN.append({"prompts": prompts, "completions": completions, "completion_ids": completion_ids,
                 "step": trainer_state.global_step, "max_steps": trainer_state.max_steps, "target": target,
                 "kwargs": sorted(kwargs)})
    log_metric("ids_per_completion", sum(map(len, completion_ids)) / len(completion_ids))
    log_extra("content_chars", [len(c[0]["content"]) for c in completions])
    return [float(len(c[0]["content"])) / 100 for c in completions]


def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    """A verl user's compute_score: a dict with the score and an extra entry, as verl's managers accept."""
    hit = ground_truth in solution_str and data_source == "bundled_arithmetic"
    return {"score": 1.0 if hit else 0.0, "length": len(solution_str), "question_seen": float("source" in extra_info)}


TRL_REWARDS = ["+reward.funcs.think._target_=trl.rewards.think_format_reward", "+reward.funcs.think._partial_=true",
               "+reward.funcs.mine._target_=test_reward_adapters.user_reward", "+reward.funcs.mine._partial_=true",
               "reward.conversational=[think,mine]", "allowed_targets=[test_reward_adapters]"]
VERL_REWARD = ["reward=verl", "reward.funcs.score.compute_score._target_=test_reward_adapters.compute_score",
               "allowed_targets=[test_reward_adapters]"]


def test_trl_think_format_reward_scores_conversational_completions(make_cfg):
    from enigma_lightning.runtime.validate import config_problems

    cfg = make_cfg(*TRL_REWARDS[:2], "reward.conversational=[think]")
    assert config_problems(cfg) == []  # trl.rewards is allowed without allowed_targets
    reward = instantiate(cfg.reward)
    messages = [[{"role": "user", "content": "What is 12 + 7?"}]] * 3
    per_func, _ = reward(["p"] * 3, [THINK, VALID, "19"], prompt_messages=messages, completion_ids=[[1]] * 3,
                         trainer_state=None, target=["19"] * 3)
    think = reward.names.index("think")
    assert per_func[:, think].tolist() == [1.0, 0.0, 0.0]
    assert per_func[:, reward.names.index("format")].tolist()[1] == 1.0  # ours still get text


def test_a_conversational_reward_given_text_names_the_setting(make_cfg):
    reward = instantiate(make_cfg(*TRL_REWARDS[:2]).reward)  # think not listed in reward.conversational
    with pytest.raises(TypeError, match=r"reward.conversational=\[think\]"):
        reward(["p"], [THINK], prompt_messages=None, completion_ids=[[1]], trainer_state=None, target=["19"])


def test_our_signature_without_kwargs_still_works():
    from enigma_lightning.rewards import RewardModel

    def old_style(prompts, completions, target):  # no **kwargs: gets only what it names
        return [float(t in c) for c, t in zip(completions, target, strict=True)]

    per_func, _ = RewardModel({"old": old_style}, conversational=[])(["p"], [VALID], completion_ids=[[1]],
                                                                     trainer_state=None, target=["19"], task=["add"])
    assert per_func.tolist() == [[1.0]]


def test_verl_compute_score_plugs_in_unchanged(make_cfg):
    from enigma_lightning.runtime.validate import config_problems

    cfg = make_cfg(*VERL_REWARD)
    assert config_problems(cfg) == []
    reward = instantiate(cfg.reward)
    wrong = VALID.replace("19", "20")
    per_func, total = reward(["p1", "p2"], [VALID, wrong], completion_ids=[[1], [2]], trainer_state=None,
                             target=["19", "19"], type=["bundled_arithmetic"] * 2, source=["q", "q"], task=["add"] * 2)
    assert per_func[:, reward.names.index("score")].tolist() == [1.0, 0.0]
    assert {k: v for k, v in reward.last_logged.items() if k[0] == "score"} == {
        ("score", "length"): (len(VALID) + len(wrong)) / 2, ("score", "question_seen"): 1.0}
    # the example it replaces, our gated correctness in verl's signature
    default = instantiate(make_cfg("reward=verl").reward)
    per_func, _ = default(["p"] * 2, [VALID, wrong], target=["19", "19"], type=["x"] * 2)
    assert per_func[:, default.names.index("score")].tolist() == [1.0, 0.0]


def test_verl_adapter_names_a_missing_column(make_cfg):
    reward = instantiate(make_cfg(*VERL_REWARD, "reward.funcs.score.data_source=origin").reward)
    with pytest.raises(KeyError, match="data_source='origin' is not a column"):
        reward(["p"], [VALID], target=["19"], type=["x"])


def test_a_run_with_trl_and_verl_rewards(make_cfg, tmp_path):
    from enigma_lightning.commands.train import task

    SEEN.clear()
    out = tmp_path / "run"
    task(make_cfg("experiment=smoke", "trainer.max_steps=2", *VERL_REWARD, *TRL_REWARDS, out=out))
    assert [s["step"] for s in SEEN] == [0, 1] and all(s["max_steps"] == 2 for s in SEEN)
    first = SEEN[0]
    n = len(first["completions"])
    assert n == 8 and len(first["completion_ids"]) == n and len(first["target"]) == n
    assert all(isinstance(i, int) for ids in first["completion_ids"] for i in ids)
    assert first["prompts"][0][0]["role"] == "system" and first["prompts"][0][-1]["role"] == "user"
    assert first["completions"][0][0]["role"] == "assistant"
    assert first["completions"][0][0]["content"].startswith("<reasoning>")  # the prefill is part of the content
    assert {"source", "task", "type"} <= set(first["kwargs"])
    with open(out / "metrics.csv") as f:
        header = next(csv.reader(f))
    for name in ("train/reward/think/mean", "train/reward/mine/mean", "train/reward/score/mean",
                 "train/reward/mine/logged/ids_per_completion", "train/reward/score/logged/length", "train/entropy"):
        assert name in header, name
    assert json.loads((out / "summary.json").read_text())["final"]["train/entropy"] > 0
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {0, 1}
    assert all(s["content_chars"] == len(s["completion"]) for s in samples)  # log_extra's column, row by row
