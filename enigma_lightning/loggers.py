"""Logger factories: metrics.csv in the run folder, and W&B (online with an API key, offline otherwise)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, WandbLogger


def csv_logger(save_dir: str) -> CSVLogger:
    """Writes ``<save_dir>/metrics.csv`` (no version sub-folders: one run, one folder)."""
    return CSVLogger(save_dir=save_dir, name="", version="")


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
    offline = mode == "offline" or (mode == "auto" and (os.environ.get("WANDB_MODE") == "offline"
                                                          or not wandb_has_credentials()))
    return WandbLogger(save_dir=save_dir, project=project, offline=offline, **kwargs)


def wandb_run(cfg, out_dir: Path, job_type: str):
    """A W&B run for a command (si, evaluate, probe): ``cfg.wandb_mode`` auto | online | offline | disabled
    (None when disabled); the composed config is the run config."""
    if cfg.wandb_mode == "disabled":
        return None
    import wandb
    from omegaconf import OmegaConf

    mode = cfg.wandb_mode
    if mode == "auto":
        mode = "online" if wandb_has_credentials() and os.environ.get("WANDB_MODE") != "offline" else "offline"
    return wandb.init(project=cfg.wandb_project, dir=str(out_dir), mode=mode, job_type=job_type,
                      config=OmegaConf.to_container(cfg, resolve=True), reinit="finish_previous")
