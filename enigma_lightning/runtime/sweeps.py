"""What a job knows about the sweep it belongs to, and how a job resumes or reports its failure.

Re-running a sweep into the same folder (``hydra.sweep.dir=multirun/<date>/<time>``) with ``resume=auto`` (the
default): Hydra numbers jobs by their position in the sweep, so job ``<n>`` finds its own folder again; a job whose
``summary.json`` says ``finished`` is skipped (its summary is returned as it is), a job with a checkpoint
(``checkpoints/interrupted.ckpt`` or ``checkpoints/last.ckpt``, the newer one) resumes from it, any other job
starts afresh. ``resume=never`` retrains every job; ``rerun_failed=false`` leaves failed jobs failed. A job whose
folder was trained with other values is refused (``on_config_change=refuse``): its folder keeps its run, summary and
recorded values (``sweep.json``), and only ``refused.txt`` says why this sweep did not train it; the sweep report
lists it as refused and the sweep exits with an error.
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

RESUME_MODES = ("auto", "never")
CONFIG_CHANGE_MODES = ("refuse", "new")
REFUSED = "refused.txt"  # in a job folder: the last re-run of the sweep was refused (values differ), and why


def hydra_info() -> dict[str, Any] | None:
    """Under ``--multirun``: {"sweep": <sweep dir name>, "job": <n>, "overrides": {key: value}} of the swept keys.
    None for a single run (or outside Hydra)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except (ImportError, ValueError):
        return None
    if hc.mode != RunMode.MULTIRUN:
        return None
    sweep_dir = Path(hc.sweep.dir)
    swept = swept_keys(sweep_dir) | _param_keys(hc.sweeper.get("params") or {})
    overrides = {}
    for o in hc.overrides.task:
        key, _, value = o.partition("=")
        key = key.lstrip("+~")
        if key in swept:
            overrides[key] = _typed(value)
    return {"sweep": "/".join(sweep_dir.parts[-2:]), "sweep_dir": str(sweep_dir), "job": hc.job.num,
            "overrides": overrides, "task_overrides": list(hc.overrides.task)}


def _typed(value: str):
    """A swept value as a number or bool when it reads as one (W&B can then plot against it), else the text."""
    import yaml

    try:
        v = yaml.safe_load(value)
    except yaml.YAMLError:
        return value
    return v if isinstance(v, int | float | bool) else value


def _sweep_keys(overrides) -> set[str]:
    """The keys of the sweep overrides among ``overrides`` (``a=1,2``, ranges, globs, ``interval(...)``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser, swept = OverridesParser.create(), set()
    for text in overrides:
        try:
            (o,) = parser.parse_overrides([str(text)])
        except Exception:  # not an override this parser reads: not a sweep either
            continue
        if o.is_sweep_override():
            swept.add(o.key_or_group.lstrip("+~"))
    return swept


def _param_keys(params) -> set[str]:
    """The keys a sweeper's ``params`` sweep over (``{lr: interval(1e-6, 1e-4)}``). Optuna's sweeper writes no
    ``multirun.yaml``, so a job also reads them from its own Hydra config."""
    return _sweep_keys(f"{k}={v}" for k, v in params.items())


def swept_keys(sweep_dir: Path) -> set[str]:
    """Keys that vary across a sweep, from the sweep's ``multirun.yaml`` (written by Hydra's basic sweeper before the
    jobs start): the command line's sweep overrides (``a=1,2``, ranges, globs) and the sweeper's params (presets such
    as ``experiment=ablation``)."""
    from omegaconf import OmegaConf

    path = Path(sweep_dir) / "multirun.yaml"
    if not path.exists():
        return set()
    hydra_cfg = OmegaConf.load(path).hydra
    return _sweep_keys(hydra_cfg.overrides.task) | _param_keys(hydra_cfg.sweeper.get("params") or {})


def previous_outcome(out: Path) -> str | None:
    """``finished``, ``failed`` or None (never ran / still running / killed) from a job folder's summary.json."""
    p = out / "summary.json"
    if not p.exists():
        return None
    status = str(json.loads(p.read_text()).get("status", ""))
    return "finished" if status == "finished" else "failed" if status.startswith("failed") else None


def resume_checkpoint(out: Path) -> str | None:
    """The newer of ``checkpoints/interrupted.ckpt`` and ``checkpoints/last.ckpt`` in a job folder, if any (a sharded
    one caught between its two renames is found as ``.<name>.previous``: :mod:`.strategies`)."""
    found = []
    for p in (out / "checkpoints" / "interrupted.ckpt", out / "checkpoints" / "last.ckpt"):
        aside = p.with_name(f".{p.name}.previous")
        if p.exists() or aside.exists():
            found.append(p if p.exists() else aside)
    return str(max(found, key=lambda p: p.stat().st_mtime).resolve()) if found else None


def record_failure(out: Path, exc: BaseException) -> None:
    """``error.txt`` (the traceback) and a failed ``summary.json`` unless the trainer already wrote one."""
    out.mkdir(parents=True, exist_ok=True)
    from .folders import atomic_write_text

    atomic_write_text(out / "error.txt", "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    summary = out / "summary.json"
    if previous_outcome(out) != "failed":
        data = json.loads(summary.read_text()) if summary.exists() else {}
        data["status"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        atomic_write_text(summary, json.dumps(data, indent=2, sort_keys=True))


def record_refusal(out: Path, exc: BaseException) -> None:
    """``refused.txt``: why a re-run did not train in this folder; nothing else in the folder changes."""
    from .folders import atomic_write_text

    atomic_write_text(out / REFUSED, f"{exc}\n")


def plan(cfg: DictConfig, out: Path) -> tuple[str, str | None]:
    """("skip" | "resume" | "fresh", checkpoint) for a job folder under ``cfg.resume``."""
    if cfg.get("resume", "auto") == "never" or cfg.get("ckpt_path"):
        return "fresh", cfg.get("ckpt_path")
    outcome = previous_outcome(out)
    if outcome == "finished":
        return "skip", None
    if outcome == "failed" and not cfg.get("rerun_failed", True):
        return "skip", None
    ckpt = resume_checkpoint(out)
    return ("resume", ckpt) if ckpt else ("fresh", None)


def single_job_argv() -> None:
    """Inside a ``--multirun`` job: make ``sys.argv`` and Hydra's run dir describe this job alone.

    Lightning's DDP launcher starts ranks 1..N-1 by re-running ``sys.argv`` with ``hydra.run.dir`` set to the
    current run dir; in a sweep that would start the whole sweep again in every child. With the job's own overrides
    and its folder as the run dir, each child is a single run of exactly this job, in this job's folder."""
    import sys

    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict, read_write

    hc = HydraConfig.get()
    sys.argv = [sys.argv[0], *(str(o) for o in hc.overrides.task)]
    with read_write(hc), open_dict(hc):
        hc.run.dir = hc.runtime.output_dir
