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

from ..metrics.names import metric
from ..metrics.stats import bootstrap_rho, ranks, spearman  # noqa: F401 (ranks: the report's ranking, also tested here)
from .report import collect, job_dirs, load_si_rows, task_overrides

REWARD, FORMAT = metric("train/reward/mean"), metric("train/format/strict_rate")
KL, OT = metric("train/grpo/kl"), metric("train/ot/divergence")
VAL_ACCURACY, VAL_FORMAT = metric("val/accuracy"), metric("val/format_rate")
FORMAT_TARGET = 0.9

# quantity: (its name in the tables, the sign of its correlation with SI the claim predicts, what that means)
QUANTITIES: dict[str, tuple[str, int, str]] = {
    "reward_std": ("reward spread", -1, "higher SI, steadier reward"),
    "reward_step_std": ("reward step spread", -1, "higher SI, smaller step-to-step reward changes"),
    "kl_std": ("KL spread", -1, "higher SI, steadier KL drift"),
    "ot_std": ("OT spread", -1, "higher SI, steadier OT drift"),
    "steps_to_format90": ("steps to 90% format", -1, "higher SI, the strict format sooner"),
    "val_accuracy": ("val accuracy", 1, "higher SI, higher held-out accuracy"),
    "val_format_rate": ("val format rate", 1, "higher SI, higher held-out format rate"),
}
SI_COLUMNS = ("si", "si_ci_low", "si_ci_high", "null_si", "null_low", "null_high", "p_value", "separated")
GAIN = "full-grpo"  # the arm name of the difference full objective - GRPO ablation
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


def _order(names) -> list[str]:
    first = {"grpo": 0, "full": 1, GAIN: 99}
    return sorted(set(names), key=lambda n: (first.get(n.split(" [")[0], 50), n))


def _is_gain(arm: str) -> bool:
    return arm.split(" [")[0] == GAIN


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


def _sets(all_jobs: list[dict], si: dict[str, dict]) -> list[str]:
    """The swept sets, by SI (low to high; sets without SI last), else in job order."""
    seen = list(dict.fromkeys(j["set"] for j in all_jobs if j["set"]))
    return sorted(seen, key=lambda s: (s not in si, si[s]["si"] if s in si else 0.0, seen.index(s)))


def _si_cells(row: dict | None) -> dict[str, Any]:
    return {k: (row or {}).get(k) for k in SI_COLUMNS}


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


# --- outputs ------------------------------------------------------------------------------------------------------


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return f"{v:.{digits}g}" if isinstance(v, float) else str(v).replace("|", "\\|")


def _cell(row: dict, q: str) -> str:
    mean, sd = row[f"{q}_mean"], row[f"{q}_sd"]
    if mean is None:
        return "-"
    if q == "steps_to_format90" and row.get("format90_reached"):
        k, n = row["format90_reached"].split("/")
        if k == "0":
            return f"not reached ({n} seed{'s' if n != '1' else ''})"
        text = f"{'≥ ' if k != n else ''}{mean:.3g}" + (f" ± {sd:.2g}" if sd is not None else "")
        return text + (f" ({k}/{n} reached)" if k != n else "")
    return f"{mean:.3g}" + (f" ± {sd:.2g}" if sd is not None else "")


def _si_text(row: dict) -> str:
    if row["si"] is None:
        return "-"
    text = f"{row['si']:.4g}"
    if row["si_ci_low"] is not None and row["si_ci_high"] is not None:
        text += f" [{row['si_ci_low']:.3g}, {row['si_ci_high']:.3g}]"
    return text


def write_csvs(all_jobs: list[dict], rows: list[dict], rho: list[dict], out: Path) -> None:
    si_cols = [c for c in SI_COLUMNS if c in ("si", "si_ci_low", "si_ci_high") or any(r.get(c) is not None
                                                                                       for r in rows)]
    cols = ["set", *si_cols, "loss", "seeds", "jobs", *(f"{q}_{s}" for q in QUANTITIES for s in ("mean", "sd")),
            "format90_reached"]
    with open(out / "claim.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    cols = ["job", "set", "loss", "variant", "seed", "status", "steps_run", *QUANTITIES, "format90_reached", "error",
            "dir"]
    with open(out / "claim_jobs.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(all_jobs)
    cols = ["arm", "quantity", "sets", "rho", "ci_low", "ci_high", "expected", "direction_held", "excludes_zero", "note"]
    with open(out / "claim_rho.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rho)


def _verdict(rho: list[dict]) -> str:
    """One line: in how many of the defined correlations the claim's direction held, and how many of those have an
    interval that excludes 0."""
    defined = [c for c in rho if c["rho"] is not None]
    if not defined:
        return ("**In short:** no rank correlation could be computed (see below); the claim is not tested by this "
                "sweep.")
    held = [c for c in defined if c["direction_held"]]
    sure = [c for c in held if c["excludes_zero"]]
    against = [c for c in defined if not c["direction_held"] and c["excludes_zero"]]
    with_ci = sum(c["ci_low"] is not None for c in defined)
    text = f"**In short:** the claim's direction held in {len(held)} of {len(defined)} correlations"
    if not with_ci:
        return text + "; with one seed per set there are no intervals, so none of this is told apart from noise."
    text += f"; {len(sure)} of those have a 95% interval that excludes 0"
    return text + (f", and {len(against)} go against it with an interval that excludes 0." if against else ".")


def write_md(sweep: Path, all_jobs: list[dict], rows: list[dict], rho: list[dict], si: dict[str, dict],
             si_note: str, si_where: Path | None, out: Path) -> str:
    done = [j for j in all_jobs if j["status"] == "finished"]
    sets = _sets(all_jobs, si)
    seeds = sorted({j["seed"] for j in all_jobs}, key=lambda s: (len(s), s))
    shown = [q for q in QUANTITIES if any(r[f"{q}_mean"] is not None for r in rows)]
    lines = ["# Do principle sets with a higher SI train steadier and score better?", "",
             "ENIGMA (arXiv 2510.11278) claims that principle sets with a high Sufficiency Index \"predict steadier "
             "training dynamics and improved benchmark performance over GRPO ablations\". This report tests it on the "
             f"sweep `{sweep}`: {len(all_jobs)} job{'s' if len(all_jobs) != 1 else ''} ({len(done)} finished), sets {', '.join(sets) or '-'}, loss arms "
             f"{', '.join(_order(j['arm'] for j in all_jobs if j['loss'])) or '-'}, seeds {', '.join(seeds) or '-'}.",
             "", _verdict(rho), "", "## SI of the principle sets (base model)", ""]
    if si_note:
        lines += [f"SI not available: {si_note}. The tables below have no SI and no correlation is computed.", ""]
    set_rows = [{"set": s, **_si_cells(si.get(s))} for s in sets]
    extra = [c for c in ("null_si", "p_value", "separated") if any(r.get(c) is not None for r in set_rows)]
    lines += [f"From `{si_where}`." if si_where else "", "",
              "| set | SI [95% CI] |" + "".join(f" {c} |" for c in extra), "|---|---|" + "---|" * len(extra)]
    lines += [f"| {r['set']} | {_si_text(r)} |" + "".join(f" {_fmt(r.get(c))} |" for c in extra) for r in set_rows]
    unseparated = [r["set"] for r in set_rows if r.get("separated") is False]
    if unseparated:
        lines += ["", f"Not separated from the null (their SI could be noise): {', '.join(unseparated)}."]
    lines += ["", "## Per set and loss arm", "",
              "Mean ± sd over seeds (finished jobs). `full-grpo`: the full objective minus the GRPO ablation, paired "
              "by seed.", "",
              "| set | SI | loss | seeds |" + "".join(f" {QUANTITIES[q][0]} |" for q in shown),
              "|---|---|---|---|" + "---|" * len(shown)]
    for r in rows:
        seeds_cell = str(r["seeds"]) if _is_gain(r["loss"]) else f"{r['seeds']}/{r['jobs']}"
        lines.append(f"| {r['set']} | {_fmt(r['si'], 4)} | {r['loss']} | {seeds_cell} |"
                     + "".join(f" {_cell(r, q)} |" for q in shown))
    lines += ["", "## Rank correlation of SI with each quantity", "",
              "Spearman's rho across sets (per-set means); 95% interval: seeds resampled within each set. The claim "
              "expects a negative rho for the spreads and the steps to 90% format, a positive one for the held-out "
              "results.", "", "| arm | quantity | sets | rho | 95% interval | claim expects | direction held | "
              "interval excludes 0 |", "|---|---|---|---|---|---|---|---|"]
    for c in rho:
        interval = f"[{c['ci_low']:+.2f}, {c['ci_high']:+.2f}]" if c["ci_low"] is not None else "-"
        lines.append(f"| {c['arm']} | {QUANTITIES[c['quantity']][0]} | {c['sets']} | "
                     f"{'-' if c['rho'] is None else format(c['rho'], '+.2f')} | {interval} | "
                     f"{'rho > 0' if c['expected'] == 'positive' else 'rho < 0'} | "
                     f"{_fmt(c['direction_held'])} | {_fmt(c['excludes_zero'])} |")
    lines += ["", *[f"- {c['note']}" for c in rho]]
    if not rho:
        lines += ["No correlation: no set has both SI and results."]
    failed = [j for j in all_jobs if j["status"] != "finished"]
    if failed:
        lines += ["", "## Jobs that did not finish (left out of every mean)", ""]
        lines += [f"- job {j['job']} (set {j['set']}, loss {j['arm']}, seed {j['seed']}): {j['status']}: "
                  f"{j['error'] or 'no error recorded'} (`{j['dir']}`)" for j in failed]
    lines += ["", "## How the quantities are computed", "",
              f"- reward spread: sd over steps of `{REWARD}`; reward step spread: sd of its change from one step to "
              "the next (population sd of each job's trajectory).",
              f"- KL spread, OT spread: sd over steps of `{KL}` (logged when `grpo.beta != 0`) and `{OT}` (arms with "
              "the OT term).",
              f"- steps to 90% format: steps until `{FORMAT}` first reaches {FORMAT_TARGET}; a job that never does "
              "counts as its steps + 1 (a lower bound: `≥`), with how many seeds got there.",
              f"- val accuracy, val format rate: the final `{VAL_ACCURACY}` and `{VAL_FORMAT}` (held-out split, greedy).",
              "", "Per job: claim_jobs.csv; per set and arm: claim.csv; correlations: claim_rho.csv; plot: claim.png.",
              ""]
    text = "\n".join(lines)
    (out / "claim.md").write_text(text)
    return text


def plot(rows: list[dict], out: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [a for a in _order(r["loss"] for r in rows) if not _is_gain(a)]
    shown = [q for q in QUANTITIES if any(r["si"] is not None and r[f"{q}_mean"] is not None
                                          for r in rows if r["loss"] in arms)]
    if not shown:
        return False
    ncol = min(4, len(shown))
    nrow = math.ceil(len(shown) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.8 * ncol, 3.3 * nrow), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, q in zip(axes.flat, shown, strict=False):
        for i, arm in enumerate(arms):
            pts = [r for r in rows if r["loss"] == arm and r["si"] is not None and r[f"{q}_mean"] is not None]
            if not pts:
                continue
            xerr = None
            if all(r["si_ci_low"] is not None and r["si_ci_high"] is not None for r in pts):
                xerr = [[max(r["si"] - r["si_ci_low"], 0) for r in pts], [max(r["si_ci_high"] - r["si"], 0) for r in pts]]
            ax.errorbar([r["si"] for r in pts], [r[f"{q}_mean"] for r in pts],
                        yerr=[r[f"{q}_sd"] or 0.0 for r in pts], xerr=xerr, capsize=3, label=arm, alpha=0.85,
                        color=colours[i % len(colours)], marker="os^vD"[i % 5], linestyle="-" if i == 0 else "--",
                        markerfacecolor=colours[i % len(colours)] if i == 0 else "none")  # arms that coincide show
            if i == 0:
                for r in pts:
                    ax.annotate(r["set"], (r["si"], r[f"{q}_mean"]), fontsize=7, xytext=(3, 3),
                                textcoords="offset points")
        ax.set_title(QUANTITIES[q][0] + (" (not reached: steps + 1)" if q == "steps_to_format90" else ""),
                     fontsize=10)
        ax.set_xlabel("Sufficiency Index (base model)")
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8, title="loss")
    fig.suptitle("Per-set means over seeds (error bars: sd over seeds; SI: its 95% CI)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "claim.png", dpi=110)
    plt.close(fig)
    return True


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
