"""Tests are offline: no hub, W&B offline. Tiny models are built locally (cached under $ENIGMA_CACHE)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")  # no progress bars in test output

import pytest  # noqa: E402
from hydra import compose, initialize_config_module  # noqa: E402


@pytest.fixture
def make_cfg(tmp_path):
    """Compose the training config with overrides; the run folder is a fresh temporary directory."""

    def _make(*overrides: str, out=None):
        out = out or tmp_path / "run"
        with initialize_config_module("enigma_lightning.conf", version_base="1.3"):
            return compose("train", overrides=[f"paths.output_dir={out}", *overrides])

    return _make


@pytest.fixture(scope="session")
def tiny_dir():
    from enigma_lightning.models.tiny import build_tiny_llama

    return build_tiny_llama()
