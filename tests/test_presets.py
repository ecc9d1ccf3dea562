"""Presets a lightning-hydra-template user looks for: debug=fdr | overfit | limit, logger=tensorboard | mlflow,
tags, and experiment=<preset> in every command."""

import csv
import json

import pytest

from enigma_lightning.commands.train import run
from enigma_lightning.runtime.validate import config_problems


@pytest.mark.parametrize("debug", ["default", "fdr", "overfit", "limit", "profile"])
def test_debug_presets_compose_and_validate(make_cfg, debug):
    assert config_problems(make_cfg(f"debug={debug}")) == []
    assert config_problems(make_cfg("experiment=smoke", f"debug={debug}")) == []


def test_debug_fdr_runs_one_step_and_writes_no_checkpoint(make_cfg, tmp_path):
    out = tmp_path / "fdr"
    summary = run(make_cfg("model=tiny", "debug=fdr", out=out))
    assert summary["status"] == "finished" and summary["global_step"] == 1
    assert not (out / "metrics.csv").exists()  # fast_dev_run logs nothing
    assert not list(out.glob("checkpoints/*")) and not (out / "policy").exists()


def test_debug_overfit_replays_one_batch_of_prompts(make_cfg, tmp_path):
    out = tmp_path / "overfit"
    summary = run(make_cfg("model=tiny", "debug=overfit", "trainer.max_steps=3", "trainer.val_check_interval=3",
                           "rollout.max_new_tokens=16", "callbacks.samples.every_n_steps=1", out=out))
    assert summary["status"] == "finished" and summary["global_step"] == 3
    prompts: dict[int, set] = {}
    for line in (out / "samples.jsonl").read_text().splitlines():
        row = json.loads(line)
        prompts.setdefault(row["step"], set()).add(row["prompt"])
    assert sorted(prompts) == [0, 1, 2] and prompts[0] == prompts[1] == prompts[2]  # the same questions every step
    assert not list(out.glob("checkpoints/*"))


def test_debug_limit_runs_three_short_steps_of_one_prompt(make_cfg, tmp_path):
    out = tmp_path / "limit"
    summary = run(make_cfg("model=tiny", "debug=limit", out=out))
    assert summary["status"] == "finished" and summary["global_step"] == 3
    with open(out / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    assert len(rows) == 3 and all(float(r["train/completions/max_length"]) <= 32 for r in rows)
    assert "val/accuracy" in summary["final"]
