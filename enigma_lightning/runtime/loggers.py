"""Logger factories: metrics.csv in the run folder, W&B (online with an API key, offline otherwise), TensorBoard and
MLflow (``pip install 'enigma-lightning[loggers]'``)."""

from __future__ import annotations

import csv
import io
import logging
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from .folders import atomic_write_text


class _ResumingWriter(ExperimentWriter):
    """Lightning's CSV writer, made safe for a run folder: a resumed run keeps the rows of the steps before the ones
    it logs again (the steps after the checkpoint are re-run, so their old rows are dropped), and every flush
    rewrites the whole file through a rename, so a crash at any moment leaves the previous metrics.csv."""

    def __init__(self, log_dir: str) -> None:
        path = Path(log_dir) / self.NAME_METRICS_FILE
        self._previous: list[dict] | None = None
        if path.is_file():
            with open(path, newline="") as f:
                self._previous = list(csv.DictReader(f))
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:  # a run folder is expected to hold files; nothing is deleted
        pass

    def save(self) -> None:
        if not self.metrics:
            return
        path = Path(self.metrics_file_path)
        if self._previous is not None:  # the first flush of a resumed run
            first = min(int(m["step"]) for m in self.metrics)
            old = [r for r in self._previous if r.get("step") not in (None, "") and int(r["step"]) < first]
            self._previous = None
        elif path.is_file():
            with open(path, newline="") as f:
                old = list(csv.DictReader(f))
        else:
            old = []
        rows = [*old, *self.metrics]
        self.metrics_keys = sorted({k for r in rows for k, v in r.items() if v not in (None, "")})
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=self.metrics_keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
        atomic_write_text(path, buf.getvalue())
        self.metrics = []


class _CSVLogger(CSVLogger):
    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ResumingWriter(log_dir=self.log_dir)
        return self._experiment


def csv_logger(save_dir: str) -> CSVLogger:
    """Writes ``<save_dir>/metrics.csv`` (no version sub-folders: one run, one folder); a run resumed in the same
    folder continues the file."""
    return _CSVLogger(save_dir=save_dir, name="", version="")


def _require(module: str, preset: str) -> None:
    import importlib.util

    from ..errors import ConfigError

    if importlib.util.find_spec(module) is None:
        raise ConfigError([f"logger={preset} needs the {module} package, which is not installed. Install it "
                           f"(pip install 'enigma-lightning[loggers]') or choose another logger: logger=csv"])


def tensorboard_logger(save_dir: str, name: str = "tensorboard", **kwargs: Any):
    """TensorBoard event files in ``<save_dir>/<name>`` (no version sub-folders: one run, one folder; a resumed run
    adds a new event file next to the old ones). View them with ``tensorboard --logdir <save_dir>/<name>``."""
    _require("tensorboard", "tensorboard")
    from lightning.pytorch.loggers import TensorBoardLogger

    return TensorBoardLogger(save_dir=save_dir, name=name, version="", **kwargs)


def mlflow_logger(tracking_uri: str, experiment_name: str, run_name: str | None = None, tags: list[str] | None = None,
                  **kwargs: Any):
    """An MLflow run in ``tracking_uri`` (a local ``file:<folder>`` store by default, written offline; or a tracking
    server's URL, or ``sqlite:///<path>``). ``tags`` is a list, as W&B's: each becomes an MLflow tag ``<tag>: "true"``.

    MLflow 3 keeps the file store in maintenance mode and refuses it unless ``MLFLOW_ALLOW_FILE_STORE=true``; a
    ``file:`` URI here opts in (the store needs no server or database, and ``mlflow ui`` still reads it)."""
    _require("mlflow", "mlflow")
    if str(tracking_uri).startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from lightning.pytorch.loggers import MLFlowLogger

    return MLFlowLogger(experiment_name=experiment_name, run_name=run_name, tracking_uri=tracking_uri,
                        tags={str(t): "true" for t in tags or []} or None, **kwargs)


def wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def wandb_logger(save_dir: str, project: str, mode: str = "auto", **kwargs: Any) -> WandbLogger:
    """``mode``: ``auto`` (online when an API key or ``wandb login`` is found, else offline), ``online`` or
    ``offline``. Offline runs land in ``<save_dir>/wandb`` and can be uploaded later with ``wandb sync``."""
    if mode not in ("auto", "online", "offline"):
        raise ValueError(f"logger.wandb.mode must be auto, online or offline; got {mode!r}")
    return WandbLogger(save_dir=save_dir, project=project, offline=resolve_mode(mode) == "offline", **kwargs)


def resolve_mode(mode: str) -> str:
    """``auto`` is online when W&B credentials are found and ``WANDB_MODE`` is not ``offline``; else the mode."""
    if mode != "auto":
        return mode
    return "online" if wandb_has_credentials() and os.environ.get("WANDB_MODE") != "offline" else "offline"


def wandb_run(cfg, out_dir: Path, job_type: str):
    """A W&B run for a command (si, evaluate, probe, lm_eval) tagged ``cfg.tags``: ``cfg.wandb_mode`` auto | online |
    offline | disabled (None when disabled); the composed config is the run config."""
    if cfg.wandb_mode == "disabled":
        return None
    import wandb
    from omegaconf import OmegaConf

    return wandb.init(project=cfg.wandb_project, dir=str(out_dir), mode=resolve_mode(cfg.wandb_mode), job_type=job_type,
                      config=OmegaConf.to_container(cfg, resolve=True), tags=list(cfg.get("tags") or []) or None,
                      reinit="finish_previous")


def one_console_handler() -> None:
    """Lightning's package logger (``lightning``) has a console handler of its own and also passes its records up to
    the root logger, to which Hydra gives a console and a file handler: every Lightning INFO line was printed twice.
    When the root logger has handlers, Lightning's own console handler goes (its lines still reach the console and
    ``train.log`` through the root's)."""
    if not logging.getLogger().handlers:
        return
    lightning_logger = logging.getLogger("lightning")
    for handler in list(lightning_logger.handlers):
        if type(handler) is logging.StreamHandler:
            lightning_logger.removeHandler(handler)
