"""Sweep report, readable without W&B:

    python -m enigma_lightning.report multirun/<date>/<time> [--si si_table.csv] [--out <folder>]

For every job folder of the sweep: its swept values (from the sweep's ``multirun.yaml``; when that is missing, the
overrides whose values differ across jobs, as the job recorded them when it trained), its status (``finished``,
``failed: <error>`` with the last line of ``error.txt``, ``refused`` when this sweep's re-run found the folder trained
with other values (``refused.txt``), or ``incomplete`` for a job that never wrote a summary), and its final metrics
from ``summary.json``. Writes in the sweep folder (or ``--out``):

- ``report.md`` and ``report.csv``: one row per job;
- ``curves.png``: reward and strict-format rate per step, one line per job (from ``metrics.csv``; jobs with identical
  curves share one line, labelled with each of them);
- ``by_<key>.png``: each final metric against each swept key;
- ``si_vs_score.png``: the principle set's Sufficiency Index against the final score, when SI figures are given
  (``--si``: a ``si_table.csv`` or ``si*.json`` from ``python -m enigma_lightning.si``; a ``si_table.csv`` in the
  sweep folder is picked up by itself).

The same report is written at the end of every training ``--multirun`` (``hydra.callbacks.sweep_report``).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback

from ..metrics.names import metric

# final metrics shown per job: (column, where in summary.json)
METRICS = {
    "reward_end": ("trends", metric("train/reward/mean"), "end_mean"),
    "format_end": ("trends", metric("train/format/strict_rate"), "end_mean"),
    "val_accuracy": ("final", metric("val/accuracy")),
    "val_accuracy_best": ("final", metric("val/accuracy_best")),
    "val_format_rate": ("final", metric("val/format_rate")),
    "sami_mi_bound": ("final", metric("train/sami/mi_bound")),
    "ot_divergence": ("final", metric("train/ot/divergence")),
    "kl": ("final", metric("train/grpo/kl")),
    "step_time_s": ("final", metric("perf/step_time")),
}


def _get(summary: dict, path: tuple) -> float | None:
    node: Any = summary
    for k in path:
        if not isinstance(node, dict) or k not in node:
            return None
        node = node[k]
    return float(node) if isinstance(node, int | float) else None


def _single_run(folder: Path) -> bool:
    """A single run's folder inside the sweep folder, not one of its jobs (experiment=si_claim measures SI into
    ``<sweep>/si``): Hydra wrote its ``.hydra/hydra.yaml`` in RUN mode."""
    path = folder / ".hydra" / "hydra.yaml"
    if not path.is_file():
        return False
    try:
        return str((yaml.safe_load(path.read_text()) or {}).get("hydra", {}).get("mode")) == "RUN"
    except yaml.YAMLError:
        return False


def job_dirs(sweep: Path) -> list[Path]:
    """Job folders (Hydra's numbered sub-folders), in job order."""
    found = [p for p in sweep.iterdir() if p.is_dir() and ((p / ".hydra").is_dir() or (p / "config.yaml").exists())
             and not _single_run(p)]
    return sorted(found, key=lambda p: (0, int(p.name)) if p.name.isdigit() else (1, p.name))


def task_overrides(job: Path) -> list[str]:
    """The command-line overrides a job folder was trained with: from its ``sweep.json`` (written once the run's
    values are checked against the folder's), else Hydra's ``.hydra/overrides.yaml`` (which Hydra rewrites on every
    launch, a refused one too)."""
    info = job / "sweep.json"
    if info.exists():
        recorded = json.loads(info.read_text()).get("task_overrides")
        if isinstance(recorded, list):
            return [str(o) for o in recorded]
    ov_file = job / ".hydra" / "overrides.yaml"
    return [str(o) for o in (yaml.safe_load(ov_file.read_text()) or [])] if ov_file.exists() else []


def collect(sweep: Path) -> list[dict[str, Any]]:
    from ..runtime.sweeps import REFUSED, swept_keys

    swept = swept_keys(sweep)
    rows = []
    for d in job_dirs(sweep):
        overrides = {}
        for o in task_overrides(d):
            key, _, value = str(o).partition("=")
            key = key.lstrip("+~")
            if not swept or key in swept:
                overrides[key] = value
        summary = json.loads((d / "summary.json").read_text()) if (d / "summary.json").exists() else {}
        status = summary.get("status", "incomplete")
        error = ""
        if (d / REFUSED).exists():  # this sweep's re-run was refused: the folder holds a run with other values
            status = "refused"
            lines = [x for x in (d / REFUSED).read_text().splitlines() if x.strip()]
            error = lines[-1].strip(" -") if lines else ""
        elif (d / "error.txt").exists():
            lines = [x for x in (d / "error.txt").read_text().splitlines() if x.strip()]
            error = lines[-1] if lines else ""
        elif status.startswith("failed"):
            error = status.partition(": ")[2]
        principle_set = None
        if (d / "config.yaml").exists():
            principle_set = (yaml.safe_load((d / "config.yaml").read_text()) or {}).get("principles", {}).get("name")
        row = {"job": d.name, **overrides, "overrides": overrides,
               "status": "failed" if status.startswith("failed") else status, "error": error,
               "principle_set": principle_set, "steps": summary.get("global_step"), "dir": str(d)}
        row.update({name: _get(summary, path) for name, path in METRICS.items()})
        rows.append(row)
    return rows


def fmt_cell(v: Any, digits: int = 4) -> str:
    """A markdown table cell: ``-`` for missing or NaN, ``yes``/``no``, floats to ``digits`` significant digits."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return f"{v:.{digits}g}" if isinstance(v, float) else str(v).replace("|", "\\|")


def write_tables(rows: list[dict], out: Path, swept: list[str]) -> str:
    metrics = [m for m in METRICS if any(r.get(m) is not None for r in rows)]
    # the principle set's name, unless the sweep's `principles` column already says it
    named = [] if "principles" in swept else ["principle_set"]
    cols = ["job", *swept, "status", "steps", *metrics, *named, "error"]
    with open(out / "report.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    show = [c for c in cols if c != "error"]
    lines = ["| " + " | ".join(show) + " |", "|" + "---|" * len(show)]
    lines += ["| " + " | ".join(fmt_cell(r.get(c)) for c in show) + " |" for r in rows]
    failed = [r for r in rows if r["status"] != "finished"]
    if failed:
        lines += ["", "Jobs that did not finish:", ""]
        lines += [f"- job {r['job']} ({r['status']}): {r['error'] or 'no error recorded'} (`{r['dir']}`)"
                  for r in failed]
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    return text


CURVES = (metric("train/reward/mean"), metric("train/format/strict_rate"))


def curve_lines(rows: list[dict], swept: list[str]) -> list[tuple[str, tuple]]:
    """(label, (points per curve metric)) per line of ``curves.png``: jobs whose curves are identical share one line,
    labelled with all of them (a line drawn on top of another would hide it)."""
    lines: dict[tuple, list[str]] = {}
    for r in rows:
        path = Path(r["dir"]) / "metrics.csv"
        if not path.exists():
            continue
        with open(path) as f:
            data = [x for x in csv.DictReader(f) if x.get(CURVES[0])]
        pts = tuple(tuple((int(x["step"]), float(x[key])) for x in data if x.get(key)) for key in CURVES)
        if any(pts):
            lines.setdefault(pts, []).append(", ".join(f"{k}={r.get(k)}" for k in swept) or f"job {r['job']}")
    return [(labels[0] if len(labels) == 1 else " = ".join(labels) + " (same curves)", pts)
            for pts, labels in lines.items()]


def _curves(rows: list[dict], swept: list[str], out: Path, plt) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for label, curves in curve_lines(rows, swept):
        for ax, pts in zip(axes, curves, strict=True):
            if pts:
                ax.plot(*zip(*pts, strict=True), marker=".", label=label)
    for ax, title in zip(axes, ("reward", "strict-format rate"), strict=True):
        ax.set_title(title)
        ax.set_xlabel("step")
    if any(ax.get_legend_handles_labels()[0] for ax in axes):
        axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)


def _by_key(rows: list[dict], key: str, metrics: list[str], out: Path, plt) -> None:
    done = [r for r in rows if r["status"] == "finished"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.2), squeeze=False)
    for ax, m in zip(axes[0], metrics, strict=True):
        pts = [(r.get(key), r[m]) for r in done if r.get(m) is not None]
        try:
            xs = [float(x) for x, _ in pts]
            order = sorted(range(len(pts)), key=lambda i: xs[i])
            ax.plot([xs[i] for i in order], [pts[i][1] for i in order], marker="o")
        except (TypeError, ValueError):  # categorical values: one bar each
            ax.bar([str(x) for x, _ in pts], [y for _, y in pts])
            ax.tick_params(axis="x", labelrotation=30)
        ax.set_title(m)
        ax.set_xlabel(key)
    fig.tight_layout()
    fig.savefig(out / f"by_{key.replace('/', '_')}.png", dpi=110)
    plt.close(fig)


def _value(v: Any) -> Any:
    """A si_table.csv cell as a number or bool when it reads as one."""
    if not isinstance(v, str):
        return v
    if v.strip().lower() in ("true", "false"):
        return v.strip().lower() == "true"
    try:
        return float(v)
    except ValueError:
        return v if v != "" else None


def load_si_rows(path: Path | None) -> dict[str, dict[str, Any]]:
    """{principle set: its row} (``si``, ``si_ci_low``, ``si_ci_high``, ... as numbers) from a si_table.csv or
    si*.json files (a file or a folder)."""
    if path is None or not path.exists():
        return {}
    files = [path] if path.is_file() else [*path.glob("si_table.csv"), *path.glob("**/si*.json")]
    rows: dict[str, dict[str, Any]] = {}
    for f in files:
        if f.suffix == ".csv":
            with open(f) as fh:
                rows.update({r["set"]: {k: _value(v) for k, v in r.items()} for r in csv.DictReader(fh)})
        else:
            d = json.loads(f.read_text())
            if "set" in d and "si" in d:
                rows[d["set"]] = d
    return {k: {**v, "si": float(v["si"])} for k, v in rows.items() if isinstance(_value(v.get("si")), float)}


def load_si(path: Path | None) -> dict[str, float]:
    """{principle set: SI} from a si_table.csv or si*.json files (a file or a folder)."""
    return {k: v["si"] for k, v in load_si_rows(path).items()}


def _si_plot(rows: list[dict], si: dict[str, float], metrics: list[str], out: Path, plt) -> bool:
    done = [r for r in rows if r["status"] == "finished" and r.get("principle_set") in si]
    if not done:
        return False
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.2), squeeze=False)
    for ax, m in zip(axes[0], metrics, strict=True):
        for r in done:
            if r.get(m) is not None:
                ax.scatter(si[r["principle_set"]], r[m])
                ax.annotate(r["principle_set"], (si[r["principle_set"]], r[m]), fontsize=7)
        ax.set_xlabel("Sufficiency Index")
        ax.set_title(m)
    fig.tight_layout()
    fig.savefig(out / "si_vs_score.png", dpi=110)
    plt.close(fig)
    return True


def report(sweep: str | Path, out: str | Path | None = None, si: str | Path | None = None) -> dict[str, Any]:
    from ..errors import EnigmaError
    from ..runtime.sweeps import swept_keys

    sweep = Path(sweep)
    if not sweep.is_dir():
        raise EnigmaError(f"report: sweep folder {sweep} does not exist. Pass multirun/<date>/<time>")
    rows = collect(sweep)
    if not rows:
        raise EnigmaError(f"report: no job folders in {sweep} (expected numbered folders with .hydra/ or config.yaml)")
    out = Path(out) if out else sweep
    out.mkdir(parents=True, exist_ok=True)
    swept = sorted(swept_keys(sweep))
    if not swept:  # no multirun.yaml: the overrides whose values differ across jobs
        keys = {k for r in rows for k in r["overrides"]}
        swept = sorted(k for k in keys if len({r["overrides"].get(k) for r in rows}) > 1)
    text = write_tables(rows, out, swept)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _curves(rows, swept, out, plt)
    plotted = [m for m in ("reward_end", "format_end", "val_accuracy") if any(r.get(m) is not None for r in rows)]
    for key in swept:
        if plotted:
            _by_key(rows, key, plotted, out, plt)
    si_values = load_si(Path(si) if si else sweep / "si_table.csv")
    has_si = bool(plotted) and _si_plot(rows, si_values, plotted, out, plt)
    print(text)
    print(f"wrote {out / 'report.md'}, {out / 'report.csv'}, {out / 'curves.png'}"
          + "".join(f", {out / ('by_' + k.replace('/', '_') + '.png')}" for k in swept if plotted)
          + (f", {out / 'si_vs_score.png'}" if has_si else ""))
    return {"rows": rows, "swept": swept, "failed": sum(r["status"] != "finished" for r in rows)}


# sweep folders whose report another callback of this process already wrote (experiment=si_claim writes it before
# its claim report, since Hydra ends callbacks in reverse order): SweepReportCallback then only sets the exit status
_WRITTEN: dict[str, dict[str, Any]] = {}


def report_once(sweep: Path, si: str | Path | None = None) -> dict[str, Any]:
    """:func:`report`, remembered so that :class:`SweepReportCallback` does not write it a second time."""
    result = report(sweep, si=si)
    _WRITTEN[str(Path(sweep).resolve())] = result
    return result


class SweepReportCallback(Callback):
    """Hydra callback: after a training ``--multirun``, the report in the sweep folder; the sweep exits with an
    error when a job failed (after every job ran and the report is written)."""

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        sweep = Path(config.hydra.sweep.dir)
        if not sweep.is_dir() or not job_dirs(sweep):
            return
        result = _WRITTEN.pop(str(sweep.resolve()), None) or report(sweep)
        if result["failed"]:
            raise SystemExit(f"{result['failed']} of {len(result['rows'])} jobs did not finish; see {sweep / 'report.md'}")


def main(argv: list[str] | None = None) -> None:
    from ..runtime.cli import exit_on_user_error

    p = argparse.ArgumentParser(prog="python -m enigma_lightning.report", description=__doc__.split("\n\n")[0])
    p.add_argument("sweep", help="the sweep folder, multirun/<date>/<time>")
    p.add_argument("--out", default=None, help="where to write the report (default: the sweep folder)")
    p.add_argument("--si", default=None, help="si_table.csv or si*.json of the principle sets (SI vs score plot)")
    args = p.parse_args(argv)
    with exit_on_user_error():
        report(args.sweep, args.out, args.si)


if __name__ == "__main__":
    main()
