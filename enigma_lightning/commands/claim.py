"""The paper's claim, tested on a sweep: do principle sets with a higher Sufficiency Index (SI) give steadier
training dynamics and better held-out results, and does the full objective gain more over the GRPO ablation?

    python -m enigma_lightning.claim multirun/<date>/<time> [--si si_table.csv] [--out <folder>]

Written at the end of ``python -m enigma_lightning.train --multirun experiment=si_claim`` (conf/experiment/si_claim.yaml)
and readable on any sweep over ``principles`` (and ``loss``, ``seed``). Per finished job, from its ``metrics.csv``,
``summary.json`` and ``config.yaml``:

- ``reward_std``: standard deviation over steps of ``train/reward/mean`` (population sd of the trajectory);
- ``reward_step_std``: the same of its step-to-step change;
- ``kl_std`` / ``ot_std``: the same of ``train/grpo/kl`` (logged when ``grpo.beta != 0``) and ``train/ot/divergence``
  (the OT term's arms);
- ``steps_to_format90``: steps until the first step whose ``train/format/strict_rate`` is at least 0.9; a job that
  never gets there counts as steps run + 1 (a lower bound), and the tables say how many got there;
- ``val_accuracy``, ``val_format_rate``: the final held-out ``val/accuracy`` and ``val/format_rate``.

Per (set, loss arm): mean and sample sd over seeds; per set, the full objective minus the GRPO ablation, paired by
seed. Then, across sets, Spearman's rank correlation of SI with each quantity's per-set mean (per arm, and for the
difference), with a 95% bootstrap interval: seeds resampled within each set, per-set means and rho recomputed (fixed
seed). With fewer than 3 sets a rank correlation says nothing and is not given.

SI figures: ``--si`` (a ``si_table.csv`` or a folder of ``si*.json``), else ``<sweep>/si/`` or ``<sweep>/si_table.csv``
when there, else measured on the base model: ``python -m enigma_lightning.si "sets=[...]"`` with the sweep's
``experiment``, ``model``, ``prompt`` and ``rollout.max_new_tokens`` overrides, into ``<sweep>/si/``.

Outputs (in the sweep folder or ``--out``): ``claim.md``; ``claim.csv`` (one row per set and arm, and per set for
``full-grpo``); ``claim_jobs.csv`` (one row per job); ``claim_rho.csv`` (one row per correlation); ``claim.png``.
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from hydra.experimental.callback import Callback

from ..metrics.stats import bootstrap_rho, ranks, spearman  # noqa: F401 (ranks: the report's ranking, also tested here)
from .claim_tables import (
    FORMAT,
    FORMAT_TARGET,
    GAIN,
    KL,
    OT,
    QUANTITIES,
    REWARD,
    VAL_ACCURACY,
    VAL_FORMAT,
    _is_gain,
    _order,
    _sets,
    _si_cells,
    plot,
    write_csvs,
    write_md,
)
from .report import collect, job_dirs, load_si_rows, task_overrides

MIN_SETS = 3


def _mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    a = np.asarray(values, float)
    return float(a.mean()), (float(a.std(ddof=1)) if len(a) > 1 else None)


# --- per job ------------------------------------------------------------------------------------------------------


def read_curves(path: Path, keys: tuple[str, ...]) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value), ...]} from a metrics.csv, ordered by step; a step logged twice (a resumed run) keeps
    its last value; empty and non-finite cells are skipped."""
    out: dict[str, dict[int, float]] = {k: {} for k in keys}
    if not path.exists():
        return {k: [] for k in keys}
    with open(path) as f:
        for row in csv.DictReader(f):
            for k in keys:
                cell = row.get(k)
                if cell in (None, "") or row.get("step") in (None, ""):
                    continue
                v = float(cell)
                if math.isfinite(v):
                    out[k][int(float(row["step"]))] = v
    return {k: sorted(v.items()) for k, v in out.items()}


def _std(points: list[tuple[int, float]]) -> float | None:
    return float(np.std([v for _, v in points])) if len(points) >= 2 else None


def arm_name(loss: Any) -> str | None:
    """``grpo``, ``full`` (GRPO + SAMI + OT) or the terms joined by ``+``, from a ``loss=`` override value
    (``[grpo,sami]``) or a config's ``loss`` node (``{grpo: true, sami: true}``)."""
    if loss is None:
        return None
    if isinstance(loss, dict):
        terms = [str(k) for k, v in loss.items() if v]
    else:
        terms = [t.strip() for t in str(loss).strip("[]").split(",") if t.strip()]
    if terms == ["full"] or set(terms) == {"grpo", "sami", "ot"}:
        return "full"
    return "+".join(terms) or None


def job_quantities(job_dir: Path, steps: int | None = None) -> dict[str, Any]:
    """The claim's quantities of one job folder (see the module's docstring)."""
    curves = read_curves(job_dir / "metrics.csv", (REWARD, FORMAT, KL, OT, VAL_ACCURACY, VAL_FORMAT))
    reward = curves[REWARD]
    changes = [(s, b - a) for (_, a), (s, b) in zip(reward, reward[1:], strict=False)]
    steps_run = max(len(reward), len(curves[FORMAT]), steps or 0)
    reached = next((s + 1 for s, v in curves[FORMAT] if v >= FORMAT_TARGET), None)
    q: dict[str, Any] = {
        "steps_run": steps_run,
        "reward_std": _std(reward),
        "reward_step_std": _std(changes),
        "kl_std": _std(curves[KL]),
        "ot_std": _std(curves[OT]),
        "format90_reached": reached is not None if curves[FORMAT] else None,
        # not reached: steps run + 1, a lower bound on when it would be
        "steps_to_format90": reached if reached is not None else (steps_run + 1 if curves[FORMAT] else None),
        "val_accuracy": curves[VAL_ACCURACY][-1][1] if curves[VAL_ACCURACY] else None,
        "val_format_rate": curves[VAL_FORMAT][-1][1] if curves[VAL_FORMAT] else None,
    }
    return q


def jobs(sweep: Path) -> list[dict[str, Any]]:
    """One dict per job folder: the report's row (status, error, overrides), its set, loss arm and seed, and the
    claim's quantities (for finished jobs)."""
    out = []
    for row in collect(sweep):
        d = Path(row["dir"])
        cfg = (yaml.safe_load((d / "config.yaml").read_text()) or {}) if (d / "config.yaml").exists() else {}
        ov = row["overrides"]
        if not ov:  # the swept keys are unknown: every override of the job
            for o in task_overrides(d):
                key, _, value = str(o).partition("=")
                ov[key.lstrip("+~")] = value
        job = {"job": row["job"], "set": ov.get("principles") or row.get("principle_set"),
               "principle_set": row.get("principle_set"),
               "loss": arm_name(ov.get("loss")) or arm_name(cfg.get("loss")),
               "seed": str(ov.get("seed", cfg.get("seed", ""))), "status": row["status"], "error": row["error"],
               "steps": row["steps"], "dir": row["dir"]}
        q = job_quantities(d, row["steps"]) if row["status"] == "finished" else {}
        # the final held-out results as the summary has them, else the last values metrics.csv logged
        for name in ("val_accuracy", "val_format_rate"):
            if row.get(name) is not None and row["status"] == "finished":
                q[name] = row[name]
        job.update({k: q.get(k) for k in ("steps_run", *QUANTITIES, "format90_reached")})
        job["overrides"] = ov
        out.append(job)
    # other swept keys (sami.weight=0.1,1.0): each value is an arm of its own, never averaged in with the others
    other = sorted({k for j in out for k in j["overrides"] if k not in ("principles", "loss", "seed")
                    and len({str(x["overrides"].get(k)) for x in out}) > 1})
    for j in out:
        j["variant"] = ", ".join(f"{k}={j['overrides'].get(k)}" for k in other)
        j["arm"] = f"{j['loss']} [{j['variant']}]" if j["variant"] else j["loss"]
    return out


# --- across jobs --------------------------------------------------------------------------------------------------


def groups(all_jobs: list[dict], si: dict[str, dict]) -> list[dict[str, Any]]:
    """One row per (set, arm): seeds finished, mean and sd of each quantity over seeds; then one ``full-grpo`` row per
    set with both arms, the difference paired by seed. An arm is a loss, and the values of any other swept key."""
    sets = _sets(all_jobs, si)
    arms = _order(j["arm"] for j in all_jobs if j["loss"])
    rows = []
    for s in sets:
        for arm in arms:
            mine = [j for j in all_jobs if j["set"] == s and j["arm"] == arm]
            if not mine:
                continue
            done = [j for j in mine if j["status"] == "finished"]
            row = {"set": s, **_si_cells(si.get(s)), "loss": arm, "seeds": len(done), "jobs": len(mine),
                   "values": {q: [j[q] for j in done if j[q] is not None] for q in QUANTITIES}}
            reached = [j["format90_reached"] for j in done if j["format90_reached"] is not None]
            row["format90_reached"] = f"{sum(reached)}/{len(reached)}" if reached else None
            rows.append(row)
        for variant in dict.fromkeys(j["variant"] for j in all_jobs):
            both = [j for j in all_jobs if j["set"] == s and j["variant"] == variant and j["loss"] in ("full", "grpo")]
            by_seed = {arm: {j["seed"]: j for j in both if j["loss"] == arm and j["status"] == "finished"}
                       for arm in ("full", "grpo")}
            if not {j["loss"] for j in both} >= {"full", "grpo"}:
                continue
            paired = sorted(set(by_seed["full"]) & set(by_seed["grpo"]))
            values = {q: [by_seed["full"][k][q] - by_seed["grpo"][k][q] for k in paired
                          if by_seed["full"][k][q] is not None and by_seed["grpo"][k][q] is not None]
                      for q in QUANTITIES}
            rows.append({"set": s, **_si_cells(si.get(s)), "loss": f"{GAIN} [{variant}]" if variant else GAIN,
                         "seeds": len(paired), "jobs": len(both), "values": values, "format90_reached": None})
    for row in rows:
        for q, vals in row["values"].items():
            row[f"{q}_mean"], row[f"{q}_sd"] = _mean_sd(vals)
    return rows


def correlations(rows: list[dict], bootstrap: int = 2000, seed: int = 0) -> list[dict[str, Any]]:
    """Spearman's rho of SI with each quantity's per-set mean, per arm: sets, rho, its bootstrap interval, whether
    the claim's direction held and whether the interval excludes 0, and a sentence that says so."""
    out: list[dict[str, Any]] = []
    if all(r["si"] is None for r in rows):
        return out  # no SI at all: the report says why
    for arm in _order(r["loss"] for r in rows):
        mine = [r for r in rows if r["loss"] == arm]
        for q, (label, sign, meaning) in QUANTITIES.items():
            usable = [r for r in mine if r["si"] is not None and r["values"][q]]
            if not usable and not any(r["values"][q] for r in mine):
                continue  # never logged in this arm (ot_std without the OT term, kl_std at beta 0)
            res = {"arm": arm, "quantity": q, "sets": len(usable), "rho": None, "ci_low": None, "ci_high": None,
                   "expected": "positive" if sign > 0 else "negative", "direction_held": None,
                   "excludes_zero": None}
            what = f"{label} ({arm.replace(GAIN, 'full objective minus GRPO', 1) if _is_gain(arm) else arm})"
            if _is_gain(arm):
                meaning = (f"higher SI, a larger {'rise' if sign > 0 else 'drop'} in {label} from adding SAMI + OT "
                           "to GRPO")
            missing = [r["set"] for r in mine if r["si"] is None and r["values"][q]]
            if len(usable) < MIN_SETS:
                res["note"] = (f"{what}: {len(usable)} set(s) with SI and results; a rank correlation needs at least "
                               f"{MIN_SETS} sets to mean anything, so none is given"
                               + (f" (no SI for {', '.join(missing)})" if missing else "") + ".")
                out.append(res)
                continue
            si = [r["si"] for r in usable]
            rho = spearman(si, [float(np.mean(r["values"][q])) for r in usable])
            if not math.isfinite(rho):
                same = "SI" if len(set(si)) == 1 else f"the per-set mean of {label}"
                res["note"] = f"{what}: not defined, {same} is the same for every set ({len(usable)} sets)."
                out.append(res)
                continue
            interval = bootstrap_rho(si, [r["values"][q] for r in usable], bootstrap, seed)
            res["rho"] = rho
            res["direction_held"] = rho * sign > 0
            held = ("in the claim's direction" if rho * sign > 0 else
                    "no rank association" if rho == 0 else "against the claim's direction")
            text = f"{what}: rho = {rho:+.2f} over {len(usable)} sets, {held} ({meaning})"
            if interval is None:
                text += "; one seed per set, so no interval: run more seeds to tell this from noise."
            else:
                res["ci_low"], res["ci_high"] = interval
                res["excludes_zero"] = interval[0] > 0 or interval[1] < 0
                text += (f"; 95% interval [{interval[0]:+.2f}, {interval[1]:+.2f}] "
                         + ("excludes 0." if res["excludes_zero"] else "includes 0: not distinguishable from no "
                            "association at these seeds."))
            res["note"] = text + (f" No SI for {', '.join(missing)}." if missing else "")
            out.append(res)
    return out


# --- SI of the swept sets -----------------------------------------------------------------------------------------

# the training command line's overrides that decide what SI is measured on: the base model, the prompt, the length of
# the chains of thought (an experiment preset sets any of these; its training settings are dropped by `si`)
SI_PASSED = ("experiment", "model", "prompt", "rollout.max_new_tokens", "rollout.max_prompt_length", "paths.cache_dir")


def si_overrides(task: list[str]) -> list[str]:
    """The overrides of a training command line (``hydra.overrides.task``) that the SI command gets; swept ones
    (``model=a,b``) cannot be measured once and are left out."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser, out = OverridesParser.create(), []
    for text in task:
        key = str(text).partition("=")[0].lstrip("+~")
        if not (key in SI_PASSED or key.startswith(("model.", "prompt."))):
            continue
        try:
            (o,) = parser.parse_overrides([str(text)])
        except Exception:
            continue
        if not o.is_sweep_override():
            out.append(str(text))
    return out


def _quote(path: Path) -> str:
    s = str(path)
    return s if re.fullmatch(r"[\w/.:@+-]+", s) else "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def si_command(sets: list[str], task: list[str], out_dir: Path, extra: list[str] | tuple = ()) -> list[str]:
    return [sys.executable, "-m", "enigma_lightning.si", f"sets=[{','.join(sets)}]", *si_overrides(task),
            *map(str, extra), f"hydra.run.dir={_quote(out_dir)}"]


def measure_si(sweep: Path, sets: list[str], task: list[str], extra: list[str] | tuple = ()) -> tuple[Path, str]:
    """Run the SI command on ``sets`` into ``<sweep>/si/`` (its output in ``<sweep>/si/command.log``); returns
    (the folder, an error or "")."""
    out_dir = sweep / "si"
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = si_command(sets, task, out_dir, extra)
    log = out_dir / "command.log"
    print(f"claim: measuring the SI of {', '.join(sets)} on the base model (log: {log}):\n  " + " ".join(cmd[1:]),
          flush=True)
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n\n")
        f.flush()
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if code != 0:
        lines = [x for x in log.read_text().splitlines() if x.strip()]
        return out_dir, f"the SI command exited with status {code}: {lines[-1] if lines else ''} (log: {log})"
    table = out_dir / "si_table.csv"  # several sets; one set: si.json in the folder
    return (table if table.exists() else out_dir), ""


def _si_source(sweep: Path, si: str | Path | None) -> Path | None:
    if si:
        return Path(si)
    for p in (sweep / "si" / "si_table.csv", sweep / "si" / "si.json", sweep / "si_table.csv"):
        if p.exists():
            return p.parent if p.name == "si.json" else p
    return None


def _task_overrides(sweep: Path) -> list[str]:
    path = sweep / "multirun.yaml"
    if not path.exists():
        return []
    return [str(o) for o in (yaml.safe_load(path.read_text()) or {}).get("hydra", {}).get("overrides", {})
            .get("task", [])]


def ensure_si(sweep: Path, si: str | Path | None = None, task: list[str] | None = None, measure: bool = True,
              extra: list[str] | tuple = ()) -> tuple[Path | None, str]:
    """(where the SI figures are, an error or ""): ``si`` when given, an earlier table in the sweep, else measured."""
    from ..errors import EnigmaError

    source = _si_source(sweep, si)
    if source is not None:
        if not source.exists():
            raise EnigmaError(f"claim: SI table {source} does not exist")
        return source, ""
    if not measure:
        return None, "no SI table given (--si) or found in the sweep folder"
    sets = list(dict.fromkeys(j["set"] for j in jobs(sweep) if j["set"]))
    if not sets:
        return None, "no principle set found in the job folders"
    return measure_si(sweep, sets, _task_overrides(sweep) if task is None else task, extra)


def claim_report(sweep: str | Path, out: str | Path | None = None, si: str | Path | None = None,
                 measure: bool = True, task: list[str] | None = None, si_args: list[str] | tuple = (),
                 bootstrap: int = 2000, seed: int = 0) -> dict[str, Any]:
    """The claim report of a sweep folder (see the module's docstring); returns its parts."""
    from ..errors import EnigmaError

    sweep = Path(sweep)
    if not sweep.is_dir():
        raise EnigmaError(f"claim: sweep folder {sweep} does not exist. Pass multirun/<date>/<time>")
    if not job_dirs(sweep):
        raise EnigmaError(f"claim: no job folders in {sweep} (expected numbered folders with .hydra/ or config.yaml)")
    where, si_note = ensure_si(sweep, si, task, measure, si_args)
    return write_report(sweep, out, where, si_note, bootstrap, seed)


def write_report(sweep: Path, out: str | Path | None, where: Path | None, si_note: str = "", bootstrap: int = 2000,
                 seed: int = 0) -> dict[str, Any]:
    """The claim report's files from the SI figures in ``where`` (None, with ``si_note`` saying why, when there are
    none)."""
    out = Path(out) if out else sweep
    out.mkdir(parents=True, exist_ok=True)
    si_rows = load_si_rows(where) if where is not None else {}
    if where is not None and not si_note and not si_rows:
        si_note = f"no SI figures in {where}"
    all_jobs = jobs(sweep)
    rows = groups(all_jobs, si_rows)
    rho = correlations(rows, bootstrap, seed)
    write_csvs(all_jobs, rows, rho, out)
    text = write_md(sweep, all_jobs, rows, rho, si_rows, si_note, where if si_rows else None, out)
    plotted = plot(rows, out)
    print(text)
    print(f"wrote {out / 'claim.md'}, {out / 'claim.csv'}, {out / 'claim_jobs.csv'}, {out / 'claim_rho.csv'}"
          + (f", {out / 'claim.png'}" if plotted else ""))
    return {"jobs": all_jobs, "rows": rows, "rho": rho, "si": si_rows, "si_source": where, "si_note": si_note}


class ClaimReportCallback(Callback):
    """Hydra callback (experiment=si_claim): at the end of a training ``--multirun``, the sweep report (report.md) and
    then the claim report. Hydra ends callbacks in reverse order, so this one runs before ``sweep_report``: it writes
    the sweep report itself (with the SI figures) and the sweep report callback then only sets the exit status.

    ``si``: a SI table to use instead of measuring (``claim_si=...``); ``si_overrides``: more settings for the SI
    command (``[num_questions=64]``)."""

    def __init__(self, si: str | None = None, si_overrides: list[str] | tuple = ()):
        self.si, self.si_overrides = si, [str(o) for o in si_overrides or ()]

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        from .report import report_once

        sweep = Path(config.hydra.sweep.dir)
        if not sweep.is_dir() or not job_dirs(sweep):
            return
        from ..errors import EnigmaError

        task = [str(o) for o in config.hydra.overrides.task]
        try:
            where, note = ensure_si(sweep, self.si, task, True, self.si_overrides)
        except EnigmaError as e:  # claim_si names no file: the reports are still written, saying so
            where, note = None, str(e)
        if note:
            print(f"claim: {note}", file=sys.stderr)
            where = None
        if config.hydra.callbacks.get("sweep_report") is not None:
            report_once(sweep, si=where)
        write_report(sweep, None, where, note)


def main(argv: list[str] | None = None) -> None:
    from ..runtime.cli import exit_on_user_error

    p = argparse.ArgumentParser(prog="python -m enigma_lightning.claim", description=__doc__.split("\n\n")[0])
    p.add_argument("sweep", help="the sweep folder, multirun/<date>/<time>")
    p.add_argument("--si", default=None, help="si_table.csv (or a folder of si*.json) of the swept principle sets; "
                   "default: <sweep>/si/ or <sweep>/si_table.csv, else measured on the base model")
    p.add_argument("--out", default=None, help="where to write the report (default: the sweep folder)")
    p.add_argument("--no-measure", action="store_true", help="do not run the SI command when no table is found")
    p.add_argument("--si-arg", action="append", default=[], help="a setting for the SI command (num_questions=64); "
                   "repeatable")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples of the seeds (default 2000)")
    args = p.parse_args(argv)
    with exit_on_user_error():
        claim_report(args.sweep, args.out, args.si, measure=not args.no_measure, si_args=args.si_arg,
                     bootstrap=args.bootstrap)


if __name__ == "__main__":
    main()
