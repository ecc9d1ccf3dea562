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


SHORT = ["experiment=smoke", "trainer.max_steps=2", "callbacks.checkpoint=null", "callbacks.export=null"]


def test_logger_tensorboard_writes_event_files(make_cfg, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    assert run(make_cfg(*SHORT, "logger=tensorboard", "tags=[smoke]", out=out))["status"] == "finished"
    assert (out / "metrics.csv").exists()  # the CSV logger comes with it
    (events,) = (out / "tensorboard").glob("events.out.tfevents.*")
    acc = EventAccumulator(str(events))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [0, 1]
    assert "val/accuracy" in acc.Tags()["scalars"]


def test_logger_mlflow_writes_a_local_run_offline(make_cfg, tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    out = tmp_path / "mlflow"
    summary = run(make_cfg(*SHORT, "logger=mlflow", "tags=[smoke,tiny]", out=out))
    assert summary["status"] == "finished" and summary["tags"] == ["smoke", "tiny"]
    client = MlflowClient(tracking_uri=f"file:{out / 'mlruns'}")
    (exp,) = [e for e in client.search_experiments() if e.name == "enigma-lightning"]
    (found,) = client.search_runs([exp.experiment_id])
    assert found.info.status == "FINISHED"
    assert {"smoke", "tiny"} <= set(found.data.tags)
    assert [m.step for m in client.get_metric_history(found.info.run_id, "train/loss")] == [0, 1]
    assert found.data.params["rollout/max_new_tokens"] == "24"  # the resolved config, as parameters


def test_tags_reach_wandb_and_must_be_a_list_of_words(make_cfg):
    cfg = make_cfg("tags=[baseline,qwen]")
    assert list(cfg.logger.wandb.tags) == ["baseline", "qwen"] and list(cfg.callbacks.summary.tags) == cfg.tags
    problems = config_problems(make_cfg("tags=baseline"))
    assert any(p.startswith("tags must be a list") and "tags=[" in p for p in problems), problems


@pytest.mark.parametrize("command", ["si", "evaluate", "probe", "lm_eval", "principles_create"])
def test_experiment_presets_compose_in_every_command(command):
    from hydra import compose, initialize_config_module

    from enigma_lightning.runtime.cli import config_options, drop_training_settings, own_keys

    for experiment in sorted(config_options("experiment")):
        with initialize_config_module("enigma_lightning.conf", version_base="1.3"):
            cfg = compose(command, overrides=[f"experiment={experiment}", "paths.output_dir=/tmp/unused"])
        kept = drop_training_settings(cfg, command)
        assert set(kept) <= own_keys(command) and {"trainer", "data", "logger", "callbacks"}.isdisjoint(kept)
    with initialize_config_module("enigma_lightning.conf", version_base="1.3"):
        cfg = drop_training_settings(compose(command, overrides=["experiment=smoke", "paths.output_dir=/tmp/x"]),
                                     command)
    assert cfg.model.name_or_path == "tiny:llama"  # what the preset sets for every command applies
    if "rollout" in cfg:
        assert cfg.rollout.max_new_tokens == 24


def test_si_runs_with_the_smoke_experiment(tmp_path):
    from helpers import run_cli

    r = run_cli("enigma_lightning.si", "experiment=smoke", "num_questions=2", "bootstrap=10", "wandb_mode=disabled",
                f"hydra.run.dir={tmp_path}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "training settings callbacks, data, logger, trainer (from experiment=smoke) do not apply" in r.stdout
    assert json.loads((tmp_path / "si.json").read_text())["num_questions"] == 2
