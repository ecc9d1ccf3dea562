"""Entry point: ``python -m enigma_lightning.train [overrides]``. Wiring only: config -> objects -> Trainer.fit."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from .cli import entry_point, exit_on_user_error

# OnExceptionCheckpoint makes Lightning look for a `last` checkpoint to resume from when ckpt_path is None; in a
# fresh run folder there is none, and the two warnings it prints about that are noise.
warnings.filterwarnings("ignore", message=r".*ckpt_path=None\)` was called without a model.*")
warnings.filterwarnings("ignore", message=r".*is set, but there is no last checkpoint available.*")
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")


def build_module(cfg: DictConfig):
    from hydra.utils import instantiate

    from .module import EnigmaModule

    terms = {name: instantiate(cfg.loss[name]) for name in cfg.loss}
    return EnigmaModule(
        model=instantiate(cfg.model),
        terms=terms,
        reward=instantiate(cfg.reward),
        sampling=instantiate(cfg.rollout),
        prompt=instantiate(cfg.prompt),
        principles=instantiate(cfg.principles),
        optimizer=instantiate(cfg.optim.optimizer),
        scheduler=instantiate(cfg.optim.scheduler) if cfg.optim.get("scheduler") else None,
        encoder=instantiate(cfg.encoder) if cfg.get("encoder") else None,
        lora=instantiate(cfg.peft) if cfg.get("peft") else None,
        seed=cfg.seed,
    )


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train one configuration; returns the run summary."""
    import json

    import lightning as L
    from hydra.utils import instantiate
    from lightning.pytorch.loggers import WandbLogger

    from .validate import validate

    validate(cfg)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    module = build_module(cfg)
    loggers = [instantiate(v) for v in (cfg.get("logger") or {}).values() if v]
    callbacks = [instantiate(v) for v in (cfg.get("callbacks") or {}).values() if v]
    trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks, default_root_dir=str(out))
    for lg in loggers:  # the run folder already has config.yaml; W&B gets the resolved config as its run config
        if isinstance(lg, WandbLogger):
            lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    summary_path = out / "summary.json"
    return json.loads(summary_path.read_text()) if summary_path.exists() else {}


@hydra.main(version_base="1.3", config_path="pkg://enigma_lightning.conf", config_name="train")
def _hydra_main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        run(cfg)


def main() -> None:
    entry_point(_hydra_main)


if __name__ == "__main__":
    main()
