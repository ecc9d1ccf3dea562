"""Entry point: ``python -m enigma_lightning.train [overrides]``. Wiring only: config -> objects -> Trainer.fit."""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from ..errors import ConfigError
from ..runtime.cli import entry_point, exit_on_user_error

log = logging.getLogger(__name__)

# OnExceptionCheckpoint makes Lightning look for a `last` checkpoint to resume from when ckpt_path is None; in a
# fresh run folder there is none, and the two warnings it prints about that are noise.
warnings.filterwarnings("ignore", message=r".*ckpt_path=None\)` was called without a model.*")
warnings.filterwarnings("ignore", message=r".*is set, but there is no last checkpoint available.*")
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
# the checkpoint holds the state after the step's optimiser update, which is what resuming needs
warnings.filterwarnings("ignore", message=r"Using ModelCheckpoint with manual optimization and every_n_train_steps.*")
# a resumed run continues metrics.csv (loggers.csv_logger) rather than deleting it, as this warning would say
warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty.*")


def build_module(cfg: DictConfig):
    """The LightningModule from ``cfg.module`` (its ``_target_``; see conf/train.yaml)."""
    from hydra.utils import instantiate

    return instantiate(cfg.module)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train one configuration; returns the run summary. Under ``resume=auto`` a finished job folder is skipped and
    an interrupted one resumes from its newest checkpoint (see :mod:`.sweeps`)."""
    from ..runtime.folders import run_lock
    from ..runtime.validate import validate

    validate(cfg)
    out = Path(cfg.paths.output_dir)
    with run_lock(out):
        return _run_locked(cfg, out)


def _run_locked(cfg: DictConfig, out: Path) -> dict[str, Any]:
    import json

    import lightning as L
    from hydra.utils import instantiate
    from lightning.pytorch.loggers import CSVLogger, WandbLogger
    from lightning.pytorch.utilities.exceptions import SIGTERMException
    from omegaconf import open_dict

    from ..runtime import allocator
    from ..runtime.folders import (
        atomic_write_text,
        check_config_matches,
        config_differences,
        new_folder,
        run_lock,
    )
    from ..runtime.guard import SignalStop
    from ..runtime.loggers import one_console_handler
    from ..runtime.sweeps import REFUSED, hydra_info, plan, single_job_argv

    one_console_handler()
    summary_path = out / "summary.json"
    action, ckpt_path = plan(cfg, out)
    if action in ("skip", "resume") and (out / "config.yaml").is_file():
        if cfg.get("on_config_change", "refuse") == "new" and \
                config_differences(OmegaConf.load(out / "config.yaml"), cfg):
            out = new_folder(out)
            with open_dict(cfg):
                cfg.paths.output_dir = str(out)
            print(f"the configuration differs from the run folder's: training in a new folder {out}")
            with run_lock(out):
                return _run_locked(cfg, out)
        check_config_matches(cfg, out)
    (out / REFUSED).unlink(missing_ok=True)  # a re-run refused earlier; this one matches the folder
    if action == "skip":
        summary = json.loads(summary_path.read_text())
        print(f"{out}: already {summary['status']}; skipped (resume=never retrains)")
        return summary
    if action == "resume":
        print(f"{out}: resuming from {ckpt_path}")
    out.mkdir(parents=True, exist_ok=True)
    sweep = hydra_info()
    if sweep is not None:  # one W&B group per sweep; the swept values as flat config keys
        atomic_write_text(out / "sweep.json", json.dumps(sweep, indent=2))
        if cfg.get("logger") and cfg.logger.get("wandb") and not cfg.logger.wandb.get("group"):
            cfg.logger.wandb.group = sweep["sweep"]
    atomic_write_text(out / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    L.seed_everything(cfg.seed, workers=True)
    if cfg.trainer.get("accelerator") == "cpu":
        allocator.configure(cfg.get("cpu_malloc", "reuse"))
    datamodule = instantiate(cfg.data)
    module = build_module(cfg)
    loggers = [instantiate(v) for v in (cfg.get("logger") or {}).values() if v]
    callbacks = [instantiate(v) for v in (cfg.get("callbacks") or {}).values() if v]
    callbacks.append(SignalStop())  # SIGTERM: every rank stops between the same two steps (runtime/guard.py)
    from ..runtime.folders import AtomicCheckpointIO

    trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks, default_root_dir=str(out),
                          plugins=[AtomicCheckpointIO()])
    for lg in loggers:  # the run folder already has config.yaml; W&B, TensorBoard and MLflow get the resolved config
        if not isinstance(lg, CSVLogger):
            params = OmegaConf.to_container(cfg, resolve=True)
            if sweep is not None:
                params.update({"sweep": sweep["sweep"], "sweep_job": sweep["job"],
                               **{f"swept/{k}": v for k, v in sweep["overrides"].items()}})
            lg.log_hyperparams(params)
    if sweep is not None and trainer.world_size > 1:
        single_job_argv()  # DDP children re-run this job only (see sweeps.single_job_argv)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except SIGTERMException:  # Lightning stops cleanly (interrupted.ckpt written) and would exit 0
        print(f"{out}: stopped by SIGTERM; resume by running the same command again", file=sys.stderr)
        raise SystemExit(143) from None
    finally:  # close this job's W&B run: the next job of a sweep in this process must start its own
        if any(isinstance(lg, WandbLogger) and lg._experiment is not None for lg in loggers):
            import wandb

            wandb.finish(exit_code=0 if summary_path.exists() and
                         json.loads(summary_path.read_text()).get("status") == "finished" else 1)
    return json.loads(summary_path.read_text()) if summary_path.exists() else {}


def task(cfg: DictConfig) -> float | dict[str, Any]:
    """One job: train, and return the run summary, or, with ``optimized_metric`` set, that metric's final value
    (what Hydra's sweepers, e.g. Optuna, minimise or maximise; NaN for a failed job)."""
    from ..errors import RunFolderMismatch
    from ..runtime.sweeps import hydra_info, record_failure, record_refusal

    if hydra_info() is None:
        with exit_on_user_error():
            summary = run(cfg)
    else:
        # In a sweep one failing job must not stop the others: its error is recorded in its folder (error.txt,
        # summary.json) for the report, and the sweep goes on; the sweep's exit status says a job failed.
        try:
            summary = run(cfg)
        except RunFolderMismatch as e:  # the folder holds a run with other values: it stays as it is
            log.error("job refused: %s", e)
            record_refusal(Path(cfg.paths.output_dir), e)
            summary = {"status": f"refused: {e}"}
        except Exception as e:
            log.exception("job failed: %s", e)
            record_failure(Path(cfg.paths.output_dir), e)
            summary = {"status": f"failed: {type(e).__name__}: {e}"}
    key = cfg.get("optimized_metric")
    if not key:
        return summary
    value = summary.get("final", {}).get(key)
    if value is None and summary.get("status") == "finished":
        raise ConfigError([f"optimized_metric={key} was not logged by this run (logged: "
                           f"{sorted(summary.get('final', {}))}). Set optimized_metric to one of them"])
    return float("nan") if value is None else float(value)


@hydra.main(version_base="1.3", config_path="pkg://enigma_lightning.conf", config_name="train")
def _hydra_main(cfg: DictConfig) -> float | dict[str, Any]:
    return task(cfg)


def main() -> None:
    entry_point(_hydra_main)


if __name__ == "__main__":
    main()
