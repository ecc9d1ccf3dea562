"""Sweeps: a failing job does not stop the others and is reported; re-running a sweep skips finished jobs and refuses
(without touching) jobs trained with other values; launcher and trainer presets compose; the report on hand-made sweep folders."""

import csv
import json

import pytest
from hydra import compose, initialize_config_module

from enigma_lightning.commands.report import report


def test_failed_job_is_reported_and_a_rerun_skips_finished_jobs(tmp_path):
    from helpers import run_cli

    sweep = tmp_path / "sweep"
    args = ["--multirun", "experiment=smoke", "step.num_generations=4,3", "trainer.max_steps=1",
            "callbacks.checkpoint=null", f"hydra.sweep.dir={sweep}"]
    r = run_cli("enigma_lightning.train", *args)
    assert r.returncode != 0 and "1 of 2 jobs did not finish" in r.stderr, r.stderr[-3000:]
    with open(sweep / "report.csv") as f:
        rows = {row["job"]: row for row in csv.DictReader(f)}
    assert rows["0"]["status"] == "finished" and rows["0"]["step.num_generations"] == "4"
    assert rows["1"]["status"] == "failed" and "step.num_generations=3" in rows["1"]["error"]
    assert "data.batch_size" in (sweep / "1" / "error.txt").read_text()
    assert "Jobs that did not finish" in (sweep / "report.md").read_text()
    mtime = (sweep / "0" / "summary.json").stat().st_mtime

    again = run_cli("enigma_lightning.train", *args)
    assert "already finished; skipped" in again.stdout + again.stderr
    assert (sweep / "0" / "summary.json").stat().st_mtime == mtime  # not retrained

    # the same sweep with another value: job 0's folder was trained with grpo.beta=0, so it is refused, named, and
    # left as it is (its summary, its recorded values); the report lists it as refused and the sweep fails
    files = {p: p.read_bytes() for p in (sweep / "0").rglob("*") if p.is_file() and ".hydra" not in p.parts}
    changed = run_cli("enigma_lightning.train", *args, "grpo.beta=0.04")
    assert changed.returncode != 0 and "2 of 2 jobs did not finish" in changed.stderr, changed.stderr[-3000:]
    assert "was trained with other values" in changed.stdout + changed.stderr
    after = {p: p.read_bytes() for p in (sweep / "0").rglob("*") if p.is_file() and ".hydra" not in p.parts}
    assert set(after) - set(files) <= {sweep / "0" / "refused.txt", sweep / "0" / "train.log"}
    assert all(after[p] == files[p] for p in files if p.name not in ("train.log", ".lock")), "the folder changed"
    assert "grpo.beta: 0.0 there, 0.04 now" in (sweep / "0" / "refused.txt").read_text()
    with open(sweep / "report.csv") as f:
        rows = {row["job"]: row for row in csv.DictReader(f)}
    assert rows["0"]["status"] == "refused" and "grpo.beta: 0.0 there, 0.04 now" in rows["0"]["error"]
    assert rows["0"]["step.num_generations"] == "4"
    # the original values again: the job is skipped as finished, and no longer reported as refused
    run_cli("enigma_lightning.train", *args)
    assert not (sweep / "0" / "refused.txt").exists()
    with open(sweep / "report.csv") as f:
        assert {row["job"]: row for row in csv.DictReader(f)}["0"]["status"] == "finished"


def _job(sweep, num, overrides, summary=None, error=None, metrics=None, principles="default"):
    d = sweep / str(num)
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (d / "config.yaml").write_text(f"principles:\n  name: {principles}\n")
    if summary is not None:
        (d / "summary.json").write_text(json.dumps(summary))
    if error:
        (d / "error.txt").write_text(f"Traceback (most recent call last):\n  ...\n{error}\n")
    if metrics:
        with open(d / "metrics.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["step", "train/reward/mean", "train/format/strict_rate"])
            w.writeheader()
            w.writerows(metrics)


def _summary(reward, acc):
    return {"status": "finished", "global_step": 3, "final": {"val/accuracy": acc},
            "trends": {"train/reward/mean": {"end_mean": reward}}}


def test_report_on_a_sweep_folder_with_failed_and_unfinished_jobs(tmp_path):
    sweep = tmp_path / "multirun" / "2026-01-01" / "00-00-00"
    curve = [{"step": i, "train/reward/mean": 0.1 * i, "train/format/strict_rate": 0.2 * i} for i in range(3)]
    _job(sweep, 0, ["principles=high_si", "trainer.max_steps=3"], _summary(0.9, 0.5), metrics=curve,
         principles="high_si")
    _job(sweep, 1, ["principles=low_si", "trainer.max_steps=3"], _summary(0.4, 0.25), metrics=curve,
         principles="low_si")
    _job(sweep, 2, ["principles=default", "trainer.max_steps=3"], {"status": "failed: RuntimeError: boom"},
         error="RuntimeError: boom")
    _job(sweep, 10, ["principles=harmless", "trainer.max_steps=3"])  # killed before any summary
    (sweep / "si_table.csv").write_text("set,si\nhigh_si,0.007\nlow_si,0.0003\n")
    result = report(sweep)
    rows = result["rows"]
    assert [r["job"] for r in rows] == ["0", "1", "2", "10"]  # numeric job order
    assert [r["status"] for r in rows] == ["finished", "finished", "failed", "incomplete"]
    assert rows[2]["error"] == "RuntimeError: boom" and rows[0]["val_accuracy"] == 0.5
    assert result["failed"] == 2
    # no multirun.yaml: the overrides that differ across jobs are the swept ones
    assert result["swept"] == ["principles"]
    md = (sweep / "report.md").read_text()
    assert md.count("\n| ") == 4 and "RuntimeError: boom" in md  # one row per job
    for name in ("curves.png", "by_principles.png", "si_vs_score.png", "report.csv"):
        assert (sweep / name).stat().st_size > 0, name
    # the swept `principles` is not repeated as principle_set; identical curves are one line with both labels
    assert "principle_set" not in md.splitlines()[0] and "principle_set" not in (sweep / "report.csv").read_text()
    from enigma_lightning.commands.report import curve_lines

    assert [label for label, _ in curve_lines(rows, result["swept"])] == [
        "principles=high_si = principles=low_si (same curves)"]


def test_report_cli_errors(tmp_path):
    from helpers import run_cli

    r = run_cli("enigma_lightning.report", tmp_path / "nope")
    assert r.returncode == 2 and "does not exist" in r.stderr
    r = run_cli("enigma_lightning.report", tmp_path)
    assert r.returncode == 2 and "no job folders" in r.stderr


@pytest.mark.parametrize("launcher", ["basic", "joblib", "submitit_local", "submitit_slurm", "slurm"])
@pytest.mark.parametrize("trainer", ["cpu", "gpu", "ddp", "ddp_cpu", "fsdp", "fsdp_cpu"])
def test_launcher_and_trainer_presets_compose(launcher, trainer):
    with initialize_config_module("enigma_lightning.conf", version_base="1.3"):
        cfg = compose("train", overrides=[f"hydra/launcher={launcher}", f"trainer={trainer}", "trainer.devices=2"],
                      return_hydra_config=True)
    launcher_cfg = cfg.hydra.launcher
    assert launcher_cfg._target_
    if launcher == "slurm":
        assert launcher_cfg.gpus_per_node == (0 if trainer in ("cpu", "ddp_cpu", "fsdp_cpu") else 2)
        assert launcher_cfg.tasks_per_node == 2


def test_optuna_search_of_two_trials_on_the_tiny_model(tmp_path):
    """hparams_search=optuna drives `train`: every trial trains, and the sweeper receives the value each returns."""
    import math

    import yaml
    from helpers import run_cli

    sweep = tmp_path / "optuna"
    r = run_cli("enigma_lightning.train", "hparams_search=optuna", "experiment=smoke", "hydra.sweeper.n_trials=2",
                "optimized_metric=train/reward/mean", "+reward.funcs.length._target_=helpers.length_reward",
                "+reward.funcs.length._partial_=true", "allowed_targets=[helpers]", "trainer.max_steps=1",
                "trainer.val_check_interval=1", "callbacks.checkpoint=null", "callbacks.export=null",
                f"hydra.sweep.dir={sweep}")
    assert r.returncode == 0, r.stderr[-3000:]
    values, params = [], []
    for job in ("0", "1"):
        summary = json.loads((sweep / job / "summary.json").read_text())
        assert summary["status"] == "finished" and summary["global_step"] == 1
        values.append(summary["final"]["train/reward/mean"])
        swept = json.loads((sweep / job / "sweep.json").read_text())["overrides"]
        assert set(swept) == {"optim.optimizer.lr", "grpo.beta", "rollout.temperature"}, swept
        params.append(swept)
    assert params[0] != params[1]
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert math.isfinite(result["best_value"]) and result["best_value"] == max(values)  # direction: maximize
    assert result["best_params"] == params[values.index(max(values))]
    assert "finished" in (sweep / "report.md").read_text()


def test_hparams_search_composes_with_the_optuna_sweeper(make_cfg):
    with initialize_config_module("enigma_lightning.conf", version_base="1.3"):
        cfg = compose("train", overrides=["hparams_search=optuna"], return_hydra_config=True)
    assert cfg.optimized_metric == "val/accuracy_best" and str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert "Optuna" in cfg.hydra.sweeper._target_ and cfg.hydra.sweeper.direction == "maximize"
    from enigma_lightning.runtime.validate import config_problems

    assert config_problems(make_cfg("hparams_search=optuna")) == []


def test_ablation_preset_sweeps_the_loss_terms():
    with initialize_config_module("enigma_lightning.conf", version_base="1.3"):
        cfg = compose("train", overrides=["experiment=ablation"], return_hydra_config=True)
    assert dict(cfg.hydra.sweeper.params) == {"loss": "grpo,[grpo,sami],[grpo,ot],full"}


def test_dashboard_names_metrics_that_a_full_run_logs(make_cfg, tmp_path):
    from enigma_lightning.commands.dashboard import LAYOUT, build, describe
    from enigma_lightning.commands.train import run

    out = tmp_path / "run"
    run(make_cfg("experiment=smoke", "loss=full", "grpo.beta=0.04", "trainer.max_steps=2", "callbacks=probes",
                 "callbacks.probes.every_n_steps=1", "callbacks.probes.num_questions=2", out=out))
    with open(out / "metrics.csv") as f:
        logged = set(next(csv.reader(f)))
    wanted = {k for _, panels in LAYOUT for _, keys in panels if isinstance(keys, list) for k in keys}
    assert wanted - logged == set()
    workspace = build("me", "proj", group="2026-01-01/00-00-00")
    model = workspace._to_model()  # what save() would send
    assert model is not None and len(workspace.sections) == len(LAYOUT)
    assert "[Samples]" in describe(workspace)


def test_dashboard_cli_dry_run_prints_the_view():
    from helpers import run_cli

    r = run_cli("enigma_lightning.dashboard", "entity=me", "project=p", "dry_run=true")
    assert r.returncode == 0 and "not saved" in r.stdout and "train/sami/mi_bound" in r.stdout, r.stderr[-2000:]
    r = run_cli("enigma_lightning.dashboard", "project=p")
    assert r.returncode == 2 and "entity=<entity>" in r.stderr
