"""Where a user's own files live: their config root (principle sets and other config group options) and the cache.

Both are read from the environment each time they are asked for (tests and Hydra's search path plugin rely on it).
This module imports nothing heavy: ``hydra_plugins/enigma_lightning_searchpath`` calls it at search-path time.
"""

from __future__ import annotations

import os
from pathlib import Path


def config_root() -> Path:
    """``$ENIGMA_CONF`` if set, else ``$XDG_CONFIG_HOME/enigma_lightning`` (default ``~/.config/enigma_lightning``).

    Appended to Hydra's search path, so ``<root>/principles/<name>.yaml`` is selectable as ``principles=<name>``."""
    if os.environ.get("ENIGMA_CONF"):
        return Path(os.environ["ENIGMA_CONF"]).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base).expanduser() / "enigma_lightning"


def cache_root() -> Path:
    """``$ENIGMA_CACHE`` if set, else ``$XDG_CACHE_HOME/enigma_lightning`` (default ``~/.cache/enigma_lightning``)."""
    if os.environ.get("ENIGMA_CACHE"):
        return Path(os.environ["ENIGMA_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "enigma_lightning"


def principle_files_root() -> Path:
    """The search root under which ``principles=/path/to/set.yaml`` is staged: ``<cache>/principle_files``, holding
    ``principles/files/<name>-<hash>.yaml`` (selected as ``principles=files/<name>-<hash>``)."""
    return cache_root() / "principle_files"
