"""The SI claim report (experiment=si_claim, python -m enigma_lightning.claim): Spearman with ties, per-job quantities
and the correlations on hand-made sweep folders whose answers are known, the SI step's command, the Hydra callback,
and a real sweep on the tiny model."""

import csv
import json
import math

import numpy as np
import pytest
import yaml

from enigma_lightning.commands import claim
from enigma_lightning.commands.claim import ClaimReportCallback, claim_report, si_command, spearman

SI = {"low_si": 0.001, "default": 0.002, "harmless": 0.003, "high_si": 0.004}
STEPS = 6


def _write_metrics(path, rows):
    cols = sorted({k for r in rows for k in r}, key=lambda c: (c != "step", c))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)


def _job(sweep, num, principles, loss, seed, amp=0.1, kl=0.01, format_at=None, val=(0.3, 0.5), status="finished",
         extra=()):
    """A job folder as a real one looks: .hydra/overrides.yaml, config.yaml, metrics.csv, summary.json.
    Reward alternates 0.5 +- amp (population sd over steps = amp, its changes alternate +-2 amp); KL grows linearly by
    ``kl`` per step; the strict-format rate jumps to 1 at step ``format_at`` (None: never)."""
    d = sweep / str(num)
    (d / ".hydra").mkdir(parents=True)
    overrides = [f"principles={principles}", f"loss={loss}", f"seed={seed}", f"trainer.max_steps={STEPS}", *extra]
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    terms = {"grpo": True, "sami": True, "ot": True} if loss == "full" else {"grpo": True}
    (d / "config.yaml").write_text(yaml.safe_dump({"principles": {"name": principles}, "loss": terms, "seed": seed,
                                                   "grpo": {"beta": 0.04}}))
    if status == "incomplete":
        return d
    rows = []
    for t in range(STEPS):
        r = {"step": t, "train/reward/mean": 0.5 + amp * (-1) ** t, "train/grpo/kl": kl * t,
             "train/format/strict_rate": 1.0 if format_at is not None and t >= format_at else 0.2}
        if loss == "full":
            r["train/ot/divergence"] = kl * t / 2
        rows.append(r)
    rows.append({"step": STEPS - 1, "val/accuracy": val[0], "val/format_rate": val[1]})
    _write_metrics(d / "metrics.csv", rows)
    summary = {"status": status, "global_step": STEPS, "final": {"val/accuracy": val[0], "val/format_rate": val[1]},
               "trends": {}}
    if status != "finished":
        summary = {"status": status}
        (d / "error.txt").write_text("Traceback (most recent call last):\n  ...\nRuntimeError: out of memory\n")
    (d / "summary.json").write_text(json.dumps(summary))
    return d


def _multirun_yaml(sweep, task):
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {
        "overrides": {"task": task},
        "sweeper": {"params": {"principles": "low_si,default,harmless,high_si", "loss": "grpo,full",
                               "seed": "0,1,2"}}}}))


def _si_table(path, sets=SI, null=False):
    cols = ["set", "si", "si_ci_low", "si_ci_high"] + (["null_si", "null_low", "null_high", "p_value", "separated"]
                                                       if null else [])
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for s, v in sets.items():
            w.writerow([s, v, v * 0.8, v * 1.2] + ([0.0, -0.0005, 0.0005, 0.01, s != "low_si"] if null else []))
    return path


def monotone_sweep(root, sets=SI, seeds=(0, 1)):
    """Steadiness and results monotone in SI: a higher-SI set has a smaller reward amplitude and KL slope, reaches
    the strict format sooner (low_si never) and scores higher; the full arm's amplitude is half the GRPO arm's.
    val/format_rate ties in pairs (0.5, 0.5, 0.7, 0.7). Plus a failed and an unfinished job (default, full)."""
    sweep = root / "multirun" / "2026-01-01" / "00-00-00"
    num = 0
    order = sorted(sets, key=sets.get)
    for rank, s in enumerate(order):  # rank 0 = lowest SI
        for loss in ("grpo", "full"):
            for seed in seeds:
                amp = (0.4 - 0.1 * rank) * (0.5 if loss == "full" else 1.0) + 0.001 * seed
                format_at = None if rank == 0 else 2 * (len(order) - rank) - 1
                _job(sweep, num, s, loss, seed, amp=amp, kl=0.01 * (4 - rank) + 0.0001 * seed, format_at=format_at,
                     val=(0.1 * (rank + 1) + 0.001 * seed, 0.5 if rank < 2 else 0.7))
                num += 1
    if "default" in sets:
        _job(sweep, num, "default", "full", 2, status="failed: RuntimeError: out of memory")
        _job(sweep, num + 1, "default", "grpo", 2, status="incomplete")
    _multirun_yaml(sweep, ["experiment=si_claim", "seed=0,1"])
    return sweep


def test_spearman_with_ties_matches_a_hand_computed_value():
    # ranks x: 1, 2.5, 2.5, 4; y: 1, 3, 2, 4; centred: (-1.5, 0, 0, 1.5), (-1.5, .5, -.5, 1.5)
    # rho = 4.5 / sqrt(4.5 * 5) = 3 / sqrt(10)
    assert spearman([1, 2, 2, 3], [10, 30, 20, 40]) == pytest.approx(3 / math.sqrt(10))
    assert claim.ranks([10, 20, 20, 30, 20]).tolist() == [1, 3, 3, 5, 3]
    # no ties: the textbook 1 - 6 sum d^2 / (n (n^2 - 1)); d = (0, 2, -1, -1, 0) -> 1 - 36 / 120
    assert spearman([1, 2, 3, 4, 5], [1, 4, 2, 3, 5]) == pytest.approx(0.7)
    assert spearman([1, 2, 3], [3, 2, 1]) == -1.0 and spearman([1, 2, 3], [0.1, 5, 7]) == 1.0
    assert math.isnan(spearman([1, 2, 3], [5, 5, 5])) and math.isnan(spearman([1], [2]))
    # the bootstrap: a set with one seed does not move; identical seeds give a zero-width interval
    assert claim.bootstrap_rho([1, 2, 3], [[1], [2], [3]]) is None
    assert claim.bootstrap_rho([1, 2, 3], [[1, 1], [2, 2], [3, 3]], n=50) == (1.0, 1.0)


def test_job_quantities_from_a_job_folder(tmp_path):
    d = _job(tmp_path, 0, "high_si", "full", 0, amp=0.2, kl=0.01, format_at=3, val=(0.25, 0.75))
    q = claim.job_quantities(d)
    rewards = [0.5 + 0.2 * (-1) ** t for t in range(STEPS)]
    assert q["reward_std"] == pytest.approx(0.2) and q["reward_step_std"] == pytest.approx(np.std(np.diff(rewards)))
    assert q["kl_std"] == pytest.approx(np.std([0.01 * t for t in range(STEPS)]))
    assert q["ot_std"] == pytest.approx(np.std([0.005 * t for t in range(STEPS)]))
    assert q["steps_to_format90"] == 4 and q["format90_reached"] is True  # step 3 is the 4th step
    assert (q["val_accuracy"], q["val_format_rate"]) == (0.25, 0.75)
    never = claim.job_quantities(_job(tmp_path, 1, "low_si", "grpo", 0))
    assert never["format90_reached"] is False and never["steps_to_format90"] == STEPS + 1  # a lower bound
    assert never["ot_std"] is None  # no OT term in the GRPO arm
    assert [claim.arm_name(x) for x in ("grpo", "full", "[grpo,sami]", {"grpo": True, "sami": True, "ot": True},
                                        {"grpo": True, "sami": False}, None)] == [
        "grpo", "full", "grpo+sami", "full", "grpo", None]


def test_claim_report_on_a_sweep_monotone_in_si(tmp_path):
    sweep = monotone_sweep(tmp_path)
    table = _si_table(tmp_path / "si_table.csv", null=True)
    result = claim_report(sweep, si=table, bootstrap=200)

    jobs = {j["job"]: j for j in result["jobs"]}
    assert len(jobs) == 18 and jobs["16"]["status"] == "failed" and jobs["17"]["status"] == "incomplete"
    assert "out of memory" in jobs["16"]["error"]
    rows = {(r["set"], r["loss"]): r for r in result["rows"]}
    # sets ordered by SI; the failed and unfinished jobs are counted, not averaged
    assert list(dict.fromkeys(r["set"] for r in result["rows"])) == ["low_si", "default", "harmless", "high_si"]
    assert rows["default", "full"]["seeds"] == 2 and rows["default", "full"]["jobs"] == 3
    assert rows["high_si", "grpo"]["reward_std_mean"] == pytest.approx(0.1005)
    assert rows["high_si", "grpo"]["reward_std_sd"] == pytest.approx(0.001 / math.sqrt(2))
    assert rows["low_si", "grpo"]["format90_reached"] == "0/2" and rows["low_si", "grpo"]["steps_to_format90_mean"] == 7
    # full minus GRPO, paired by seed: half the amplitude -> -amp/2
    assert rows["high_si", "full-grpo"]["reward_std_mean"] == pytest.approx(-0.05, abs=1e-3)
    assert rows["high_si", "full-grpo"]["ot_std_mean"] is None  # GRPO has no OT divergence to subtract from

    rho = {(c["arm"], c["quantity"]): c for c in result["rho"]}
    for arm in ("grpo", "full"):
        for q, sign in (("reward_std", -1), ("reward_step_std", -1), ("kl_std", -1), ("steps_to_format90", -1),
                        ("val_accuracy", 1)):
            c = rho[arm, q]
            assert c["rho"] == pytest.approx(sign) and c["sets"] == 4, (arm, q)
            assert c["direction_held"] is True and c["excludes_zero"] is True
            assert c["ci_low"] == pytest.approx(sign) and c["ci_high"] == pytest.approx(sign)  # the order never moves
        # ties: ranks (1.5, 1.5, 3.5, 3.5) against (1, 2, 3, 4): rho = 4 / sqrt(5 * 4)
        assert rho[arm, "val_format_rate"]["rho"] == pytest.approx(2 / math.sqrt(5))
    assert rho["full", "ot_std"]["rho"] == pytest.approx(-1) and ("grpo", "ot_std") not in rho
    # the gain of the full arm in reward spread (-amp/2) rises with SI: against the claim's direction
    assert rho["full-grpo", "reward_std"]["rho"] == pytest.approx(1) and not rho["full-grpo", "reward_std"][
        "direction_held"]
    # val format rate is the same in both arms: the difference is 0 everywhere and rho is not defined
    assert rho["full-grpo", "val_format_rate"]["rho"] is None and "not defined" in rho["full-grpo",
                                                                                       "val_format_rate"]["note"]

    md = (sweep / "claim.md").read_text()
    assert "reward spread (grpo): rho = -1.00 over 4 sets, in the claim's direction" in md
    assert "95% interval [-1.00, -1.00] excludes 0." in md
    assert ("the claim's direction held in 13 of 15 correlations; 13 of those have a 95% interval that excludes 0, "
            "and 2 go against it") in md
    assert "job 16 (set default, loss full, seed 2): failed" in md and "job 17" in md and "incomplete" in md
    assert "not reached (2 seeds)" in md and "| p_value | separated |" in md
    assert "Not separated from the null (their SI could be noise): low_si." in md
    with open(sweep / "claim.csv") as f:
        table_rows = list(csv.DictReader(f))
    assert len(table_rows) == 12 and {r["loss"] for r in table_rows} == {"grpo", "full", "full-grpo"}
    assert {"p_value", "separated", "reward_std_mean", "reward_std_sd", "format90_reached"} <= set(table_rows[0])
    with open(sweep / "claim_rho.csv") as f:
        assert any(r["arm"] == "grpo" and r["quantity"] == "kl_std" and float(r["rho"]) == -1 for r in csv.DictReader(f))
    with open(sweep / "claim_jobs.csv") as f:
        assert sum(1 for _ in csv.DictReader(f)) == 18
    assert (sweep / "claim.png").stat().st_size > 0
    assert not (sweep / "si").exists()  # a table was given: SI is not measured


def test_one_seed_per_set_gives_no_interval_and_two_sets_no_correlation(tmp_path):
    sweep = monotone_sweep(tmp_path / "a", sets={k: SI[k] for k in ("low_si", "harmless", "high_si")}, seeds=(0,))
    result = claim_report(sweep, si=_si_table(tmp_path / "si.csv"), bootstrap=50)
    c = next(c for c in result["rho"] if (c["arm"], c["quantity"]) == ("grpo", "reward_std"))
    assert c["rho"] == pytest.approx(-1) and c["ci_low"] is None and "one seed per set, so no interval" in c["note"]

    sweep = monotone_sweep(tmp_path / "b", sets={k: SI[k] for k in ("low_si", "high_si")})
    result = claim_report(sweep, si=_si_table(tmp_path / "si.csv"), bootstrap=50)
    assert all(c["rho"] is None for c in result["rho"])
    assert "2 set(s) with SI and results; a rank correlation needs at least 3 sets" in (sweep / "claim.md").read_text()


def test_sets_without_si_are_named_and_the_table_is_found_in_the_sweep(tmp_path):
    sweep = monotone_sweep(tmp_path)
    (sweep / "si" / ".hydra").mkdir(parents=True)  # the SI command's own run folder is not a job of the sweep
    (sweep / "si" / ".hydra" / "hydra.yaml").write_text("hydra:\n  mode: RUN\n")
    _si_table(sweep / "si" / "si_table.csv", sets={k: SI[k] for k in ("low_si", "default", "high_si")})
    result = claim_report(sweep, measure=False, bootstrap=50)
    assert len(result["jobs"]) == 18
    assert result["si_source"] == sweep / "si" / "si_table.csv"
    c = next(c for c in result["rho"] if (c["arm"], c["quantity"]) == ("grpo", "val_accuracy"))
    assert c["sets"] == 3 and c["rho"] == pytest.approx(1) and "No SI for harmless." in c["note"]

    bare = monotone_sweep(tmp_path / "bare")
    result = claim_report(bare, measure=False)
    assert result["rho"] == [] and "SI not available: no SI table given" in (bare / "claim.md").read_text()


def test_another_swept_key_makes_arms_of_its_own(tmp_path):
    sweep = tmp_path / "sweep"
    num = 0
    for rank, s in enumerate(("low_si", "harmless", "high_si")):
        for weight in (0.1, 1.0):
            for loss in ("grpo", "full"):
                amp = 0.4 - 0.1 * rank if weight == 0.1 else 0.1 + 0.1 * rank  # opposite trends per weight
                _job(sweep, num, s, loss, 0, amp=amp * (0.5 if loss == "full" else 1), extra=[f"sami.weight={weight}"])
                num += 1
    result = claim_report(sweep, si=_si_table(tmp_path / "si.csv"), bootstrap=20)
    arms = {r["loss"] for r in result["rows"]}
    assert arms == {"grpo [sami.weight=0.1]", "full [sami.weight=0.1]", "full-grpo [sami.weight=0.1]",
                    "grpo [sami.weight=1.0]", "full [sami.weight=1.0]", "full-grpo [sami.weight=1.0]"}
    assert {r["seeds"] for r in result["rows"]} == {1}  # never averaged across the weights
    rho = {(c["arm"], c["quantity"]): c["rho"] for c in result["rho"]}
    assert rho["grpo [sami.weight=0.1]", "reward_std"] == pytest.approx(-1)
    assert rho["grpo [sami.weight=1.0]", "reward_std"] == pytest.approx(1)


def test_the_si_command_gets_the_sweeps_model_prompt_and_lengths(tmp_path):
    task = ["experiment=si_claim", "model=hf", "model.name_or_path=Qwen/Qwen2.5-0.5B-Instruct", "trainer=gpu",
            "principles=low_si,high_si", "seed=0,1", "rollout.max_new_tokens=64", "prompt.system='{principles}'",
            "trainer.max_steps=6", "data.batch_size=4", "rollout.temperature=0.7,1.0", "paths.cache_dir=/c"]
    cmd = si_command(["low_si", "high_si"], task, tmp_path / "a b" / "si", ["num_questions=8"])
    assert cmd[1:4] == ["-m", "enigma_lightning.si", "sets=[low_si,high_si]"]
    assert cmd[4:] == ["experiment=si_claim", "model=hf", "model.name_or_path=Qwen/Qwen2.5-0.5B-Instruct",
                       "rollout.max_new_tokens=64", "prompt.system='{principles}'", "paths.cache_dir=/c",
                       "num_questions=8", f"hydra.run.dir='{tmp_path / 'a b' / 'si'}'"]


def test_the_callback_writes_the_sweep_report_then_the_claim_report(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from enigma_lightning.commands.report import SweepReportCallback

    sweep = monotone_sweep(tmp_path)
    table = _si_table(tmp_path / "si_table.csv")
    ran = []
    monkeypatch.setattr(claim.subprocess, "run", lambda *a, **k: ran.append(a))
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}, "overrides": {"task": ["seed=0,1"]},
                                         "callbacks": {"sweep_report": {}, "si_claim": {}}}})
    ClaimReportCallback(si=str(table)).on_multirun_end(config)
    assert ran == []  # claim_si given: no SI command
    assert (sweep / "report.md").exists() and (sweep / "si_vs_score.png").exists()  # the sweep report has the SI
    assert (sweep / "claim.md").stat().st_mtime >= (sweep / "report.md").stat().st_mtime
    mtime = (sweep / "report.md").stat().st_mtime_ns
    with pytest.raises(SystemExit, match="2 of 18 jobs did not finish"):  # Hydra calls it after this one
        SweepReportCallback().on_multirun_end(config)
    assert (sweep / "report.md").stat().st_mtime_ns == mtime  # not written twice

    # no table: the SI command runs; when it fails, the claim report says why
    def fails(cmd, **kwargs):
        ran.append(cmd)
        kwargs["stdout"].write("error: the model is not there\n")
        return type("Done", (), {"returncode": 2})()

    monkeypatch.setattr(claim.subprocess, "run", fails)
    other = monotone_sweep(tmp_path / "other")
    ClaimReportCallback().on_multirun_end(OmegaConf.create({"hydra": {
        "sweep": {"dir": str(other)}, "overrides": {"task": ["experiment=si_claim", "model=tiny"]},
        "callbacks": {"si_claim": {}}}}))
    (cmd,) = ran
    assert cmd[3:6] == ["sets=[low_si,default,harmless,high_si]", "experiment=si_claim", "model=tiny"]
    md = (other / "claim.md").read_text()
    assert "SI not available: the SI command exited with status 2: error: the model is not there" in md
    assert not (other / "report.md").exists()  # no sweep_report callback in this config


def test_claim_cli(tmp_path, capsys, monkeypatch):
    sweep = monotone_sweep(tmp_path)
    claim.main([str(sweep), "--si", str(_si_table(tmp_path / "t.csv")), "--out", str(tmp_path / "out"),
                "--bootstrap", "20"])
    assert (tmp_path / "out" / "claim.md").exists() and not (sweep / "claim.md").exists()

    # no table: the SI command runs with the sweep's overrides (multirun.yaml) and its table is read
    def measures(cmd, **kwargs):
        ran.append(cmd)
        _si_table(sweep / "si" / "si_table.csv")
        return type("Done", (), {"returncode": 0})()

    ran = []
    monkeypatch.setattr(claim.subprocess, "run", measures)
    claim.main([str(sweep), "--si-arg", "num_questions=8", "--bootstrap", "20"])
    (cmd,) = ran
    assert cmd[3:6] == ["sets=[low_si,default,harmless,high_si]", "experiment=si_claim", "num_questions=8"]
    assert "From `" + str(sweep / "si" / "si_table.csv") in (sweep / "claim.md").read_text()
    claim.main([str(sweep), "--bootstrap", "20"])  # measured once: the table in the sweep is used again
    assert len(ran) == 1
    with pytest.raises(SystemExit) as e:
        claim.main([str(tmp_path / "nope")])
    assert e.value.code == 2 and "does not exist" in capsys.readouterr().err


def test_preset_sweeps_sets_losses_seeds_and_the_command_line_wins():
    from hydra import compose, initialize_config_module
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    with initialize_config_module("enigma_lightning.conf", version_base="1.3"):
        cfg = compose("train", overrides=["experiment=si_claim"], return_hydra_config=True)
    params = dict(cfg.hydra.sweeper.params)
    assert params == {"principles": "low_si,default,harmless,high_si", "loss": "grpo,full", "seed": "0,1,2"}
    assert cfg.grpo.beta == 0.04 and cfg.claim_si is None
    assert list(cfg.hydra.callbacks) == ["sweep_report", "si_claim"]
    # the basic sweeper's own merge: preset params first, the command line's same key replaces them
    overrides = OverridesParser.create().parse_overrides(
        [f"{k}={v}" for k, v in params.items()] + ["seed=0,1", "principles=low_si,high_si", "trainer.max_steps=6"])
    (batch,) = BasicSweeper.split_arguments(overrides, None)
    assert len(batch) == 2 * 2 * 2 and {tuple(sorted(j)) for j in batch} >= {
        ("loss=full", "principles=high_si", "seed=1", "trainer.max_steps=6")}
    from enigma_lightning.runtime.validate import config_problems

    with initialize_config_module("enigma_lightning.conf", version_base="1.3"):
        for loss in ("grpo", "full"):  # the CPU demo's sizes are valid in both arms
            job = compose("train", overrides=["experiment=si_claim", f"loss={loss}", "trainer.max_steps=6",
                                              "data.batch_size=4", "rollout.max_new_tokens=64", "claim_si=t.csv",
                                              "paths.output_dir=/tmp/unused"])
            assert config_problems(job) == []


SWEEP_ARGS = ["--multirun", "experiment=[smoke,si_claim]", "principles=low_si,default,high_si", "seed=0",
              "callbacks.checkpoint=null", "callbacks.export=null", "data.val_size=4", "encoder=none",
              "+reward.funcs.length._target_=helpers.length_reward", "+reward.funcs.length._partial_=true",
              "allowed_targets=[helpers]",
              'hydra.callbacks.si_claim.si_overrides=["num_questions=2","bootstrap=20","wandb_mode=disabled"]']


@pytest.mark.slow
def test_a_real_si_claim_sweep_on_the_tiny_model(tmp_path):
    """3 sets x 2 losses x 1 seed on the tiny random model, the SI of the 3 sets measured at the end, the claim
    report on them."""
    from helpers import run_cli

    sweep = tmp_path / "sweep"
    r = run_cli("enigma_lightning.train", *SWEEP_ARGS, "trainer.max_steps=3", "trainer.val_check_interval=3",
                f"hydra.sweep.dir={sweep}")
    assert r.returncode == 0, r.stderr[-3000:]
    _check_real_sweep(sweep)


def _check_real_sweep(sweep):
    with open(sweep / "claim_jobs.csv") as f:
        jobs = list(csv.DictReader(f))
    # the command line's principles and seed replaced the preset's: 3 x 2 x 1 jobs, all finished
    assert sorted((j["set"], j["loss"], j["seed"]) for j in jobs) == sorted(
        (s, loss, "0") for s in ("low_si", "default", "high_si") for loss in ("grpo", "full"))
    assert {j["status"] for j in jobs} == {"finished"}
    for j in jobs:  # grpo.beta=0.04: KL is logged in both arms
        assert "train/grpo/kl" in json.loads((sweep / j["job"] / "summary.json").read_text())["final"], j
    with open(sweep / "si" / "si_table.csv") as f:
        si = {r["set"]: r for r in csv.DictReader(f)}
    assert set(si) == {"low_si", "default", "high_si"} and {r["num_questions"] for r in si.values()} == {"2"}
    assert "experiment=[smoke,si_claim]" in (sweep / "si" / "command.log").read_text().splitlines()[0]
    with open(sweep / "claim.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 9 and all(r["si"] != "" for r in rows)
    md = (sweep / "claim.md").read_text()
    assert "## Rank correlation of SI" in md and ("over 3 sets" in md or "not defined" in md)
    for name in ("report.md", "si_vs_score.png", "claim.png", "claim_rho.csv"):
        assert (sweep / name).stat().st_size > 0, name


def test_a_tiny_si_claim_sweep_of_one_step(tmp_path):
    """The same sweep at one step per job and the shortest completions: the wiring end to end (preset, sweep,
    callbacks, SI command on the tiny model, claim report)."""
    from helpers import run_cli

    sweep = tmp_path / "sweep"
    r = run_cli("enigma_lightning.train", *SWEEP_ARGS, "trainer.max_steps=1", "trainer.val_check_interval=1",
                "data.batch_size=4", "rollout.max_new_tokens=8", "data.val_batch_size=4", "trainer.limit_val_batches=1",
                f"hydra.sweep.dir={sweep}")
    assert r.returncode == 0, r.stderr[-3000:]
    _check_real_sweep(sweep)
