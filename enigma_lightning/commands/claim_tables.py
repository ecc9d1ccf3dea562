"""The claim report's quantities and what it writes: ``claim.md``, ``claim.csv``, ``claim_jobs.csv``, ``claim_rho.csv``
and ``claim.png`` (:mod:`.claim` computes them from a sweep)."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

from ..metrics.names import metric
from .report import fmt_cell

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


def _order(names) -> list[str]:
    first = {"grpo": 0, "full": 1, GAIN: 99}
    return sorted(set(names), key=lambda n: (first.get(n.split(" [")[0], 50), n))


def _is_gain(arm: str) -> bool:
    return arm.split(" [")[0] == GAIN


def _sets(all_jobs: list[dict], si: dict[str, dict]) -> list[str]:
    """The swept sets, by SI (low to high; sets without SI last), else in job order."""
    seen = list(dict.fromkeys(j["set"] for j in all_jobs if j["set"]))
    return sorted(seen, key=lambda s: (s not in si, si[s]["si"] if s in si else 0.0, seen.index(s)))


def _si_cells(row: dict | None) -> dict[str, Any]:
    return {k: (row or {}).get(k) for k in SI_COLUMNS}


# --- outputs ------------------------------------------------------------------------------------------------------


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
    lines += [f"| {r['set']} | {_si_text(r)} |" + "".join(f" {fmt_cell(r.get(c), 3)} |" for c in extra)
              for r in set_rows]
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
        lines.append(f"| {r['set']} | {fmt_cell(r['si'])} | {r['loss']} | {seeds_cell} |"
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
                     f"{fmt_cell(c['direction_held'])} | {fmt_cell(c['excludes_zero'])} |")
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
