"""Run folders keep their data: one live run per folder, a changed config is refused (or trained in a new folder),
metrics.csv and samples.jsonl are never truncated or repeated, a failed restore changes nothing, SIGTERM exits 143."""

import csv
import json
from types import SimpleNamespace

import pytest
from helpers import run_cli
from omegaconf import OmegaConf

from enigma_lightning.commands.train import run
from enigma_lightning.errors import ConfigError, EnigmaError
from enigma_lightning.runtime.folders import run_lock

QUICK = ["experiment=smoke", "trainer.limit_val_batches=0", "trainer.max_steps=2"]


def test_a_second_live_run_in_the_same_folder_is_refused(tmp_path):
    with run_lock(tmp_path), pytest.raises(EnigmaError, match="is in use by a live run \\(pid"):
        with run_lock(tmp_path):
            pass
    with run_lock(tmp_path):  # released when the first run ends
        pass


def _finished_folder(cfg, out):
    out.mkdir(parents=True)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (out / "summary.json").write_text(json.dumps({"status": "finished", "global_step": 2}))


def test_rerun_with_other_values_is_refused_and_names_them(make_cfg, tmp_path):
    out = tmp_path / "run"
    _finished_folder(make_cfg(*QUICK, out=out), out)
    assert run(make_cfg(*QUICK, out=out))["status"] == "finished"  # same values: skipped
    before = (out / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"trained with other values.*grpo.beta: 0.0 there, 0.04 now.*"
                                          r"on_config_change=new"):
        run(make_cfg(*QUICK, "grpo.beta=0.04", out=out))
    assert (out / "config.yaml").read_text() == before


def test_metrics_csv_survives_a_resume_killed_before_its_first_flush(tmp_path):
    from enigma_lightning.runtime.loggers import csv_logger

    path = tmp_path / "metrics.csv"
    path.write_text("step,train/loss\n0,1.0\n1,2.0\n2,3.0\n")
    assert csv_logger(str(tmp_path)).experiment is not None  # a resumed run's writer, never flushed
    assert path.read_text() == "step,train/loss\n0,1.0\n1,2.0\n2,3.0\n"
    writer = csv_logger(str(tmp_path)).experiment
    writer.log_metrics({"train/loss": 9.0}, step=2)  # the resumed run re-runs step 2
    writer.save()
    with open(path) as f:
        assert [(r["step"], r["train/loss"]) for r in csv.DictReader(f)] == [("0", "1.0"), ("1", "2.0"), ("2", "9.0")]
    assert not list(tmp_path.glob(".*tmp"))


def test_samples_of_re_run_steps_are_not_repeated(tmp_path):
    from enigma_lightning.runtime.callbacks import CompletionSamples

    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps({"step": s, "completion": "x"}) + "\n" for s in (0, 1, 2, 3)))
    CompletionSamples().on_train_start(SimpleNamespace(default_root_dir=str(tmp_path), is_global_zero=True,
                                                       global_step=2), None)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 1]


def test_failed_restore_changes_nothing_and_sigterm_exits_143(tmp_path):
    out = tmp_path / "run"
    args = [*QUICK, "+callbacks.term._target_=helpers.sigterm_at", "+callbacks.term.at_step=1",
            "allowed_targets=[helpers]", f"hydra.run.dir={out}"]
    r = run_cli("enigma_lightning.train", *args)
    assert r.returncode == 143, r.stderr[-2000:]
    assert "stopped by SIGTERM" in r.stderr
    assert (r.stdout + r.stderr).count("Seed set to") == 1  # each Lightning INFO line once
    ckpt = out / "checkpoints" / "interrupted.ckpt"
    assert ckpt.is_file()
    ckpt.write_bytes(ckpt.read_bytes()[:1000])  # a checkpoint cut short (a full disk, a copy that stopped)
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and "wandb" not in p.parts}
    r = run_cli("enigma_lightning.train", *args)
    assert r.returncode != 0
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and "wandb" not in p.parts}
    changed = [p for p in files if after.get(p) != files[p] and p.name not in ("train.log", ".lock")]
    assert not changed and set(after) - set(files) <= {out / "train.log", out / "error.txt"}, changed


def test_folder_written_before_a_setting_existed_resumes_unless_the_setting_is_given(tmp_path):
    """A run folder from an older version lacks settings added since: they take their current values (named on
    stderr) and the folder is skipped or resumed as usual; setting one of them on the command line is a difference."""
    out = tmp_path / "run"
    args = [*QUICK, "trainer.max_steps=1", f"hydra.run.dir={out}"]
    r = run_cli("enigma_lightning.train", *args)
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = OmegaConf.load(out / "config.yaml")
    del cfg.rollout["long_prompts"]  # as written before rollout.long_prompts existed
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    r = run_cli("enigma_lightning.train", *args)
    assert r.returncode == 0 and "already finished; skipped" in r.stdout, r.stdout + r.stderr[-2000:]
    assert "was written before these settings existed; they take their current values: " \
           "rollout.long_prompts='left'" in r.stderr
    r = run_cli("enigma_lightning.train", *args, "rollout.long_prompts=error")
    assert r.returncode != 0 and "rollout.long_prompts: '<unset>' there, 'error' now" in r.stderr, r.stderr[-2000:]
