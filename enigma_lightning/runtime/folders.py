"""A run folder's safety: files written whole or not at all (write, then rename), one live run per folder (a lock),
and a resumed or skipped run's configuration checked against the one the folder was trained with."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf

from ..errors import EnigmaError, RunFolderMismatch

# keys that may differ between a run folder and a re-run into it: how the run is driven, not what it trains
IGNORED = ("ckpt_path", "resume", "rerun_failed", "on_config_change", "cpu_malloc", "allowed_targets", "paths.",
           "logger.", "module.", "callbacks.", "claim_si")  # callbacks observe and save; they do not change what is trained


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a crash at any moment leaves the old file or the new one, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """Hold ``<out>/.lock`` for the run's lifetime; a second live run into the same folder is refused. The lock is
    the kernel's (flock): a killed run (``kill -9``) releases it. DDP ranks > 0 share rank 0's lock."""
    if int(os.environ.get("LOCAL_RANK", "0") or 0) > 0 or int(os.environ.get("NODE_RANK", "0") or 0) > 0:
        yield
        return
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    path = out / ".lock"
    f = open(path, "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise EnigmaError(f"run folder {out} is in use by a live run ({holder}). Wait for it to end, or train into "
                          "another folder (hydra.run.dir=<folder>)") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
    f.flush()
    try:
        yield
    finally:
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        f.close()


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def _command_line_keys() -> set[str] | None:
    """The keys set on this command line (Hydra's task overrides, ``+``/``~`` stripped); None outside Hydra."""
    try:
        from hydra.core.hydra_config import HydraConfig

        task = HydraConfig.get().overrides.task
    except (ImportError, ValueError):
        return None
    return {str(o).partition("=")[0].lstrip("+~") for o in task}


def _compare(folder_cfg: DictConfig, cfg: DictConfig) -> tuple[list[str], list[str]]:
    """(differences, settings added since the folder was written). A setting the folder's config.yaml lacks is
    "added" (it takes its current value, the behaviour the older run had when the setting was introduced with a
    default that keeps it) unless it is set on this command line, or a setting above it is (``loss=full`` adds
    ``loss.sami``): then it is a difference."""
    old = _flat(OmegaConf.to_container(folder_cfg, resolve=False))
    new = _flat(OmegaConf.to_container(cfg, resolve=True))
    keys = sorted(k for k in set(old) | set(new) if not k.startswith(IGNORED) and k not in IGNORED)
    given = _command_line_keys()
    diffs, added = [], []
    for k in keys:
        a, b = old.get(k, "<unset>"), new.get(k, "<unset>")
        if a == b:
            continue
        explicit = given is None or any(k == g or k.startswith(g + ".") for g in given)
        if k not in old and not explicit:
            added.append(f"{k}={b!r}")
        else:
            diffs.append(f"{k}: {a!r} there, {b!r} now")
    return diffs, added


def config_differences(folder_cfg: DictConfig, cfg: DictConfig) -> list[str]:
    """``key: <folder's value> there, <value> now`` for every training setting that differs (settings added since
    the folder was written and not set on the command line excepted: :func:`_compare`)."""
    return _compare(folder_cfg, cfg)[0]


def new_folder(out: Path) -> Path:
    """The first free ``<out>-2``, ``<out>-3``, ..."""
    n = 2
    while (out.parent / f"{out.name}-{n}").exists():
        n += 1
    return out.parent / f"{out.name}-{n}"


def check_config_matches(cfg: DictConfig, out: Path) -> None:
    """Refuse to resume or skip a run folder that was trained with other values (``on_config_change=refuse``)."""
    path = out / "config.yaml"
    if not path.is_file():
        return
    diffs, added = _compare(OmegaConf.load(path), cfg)
    if added and not diffs:
        import sys

        print(f"run folder {out} was written before these settings existed; they take their current values: "
              + ", ".join(added[:12]) + (f", ... and {len(added) - 12} more" if len(added) > 12 else ""),
              file=sys.stderr)
    if diffs:
        listed = "; ".join(diffs[:12]) + (f"; ... and {len(diffs) - 12} more" if len(diffs) > 12 else "")
        raise RunFolderMismatch([f"run folder {out} was trained with other values, so it is neither resumed nor "
                                 f"skipped: {listed}. Re-run with the folder's values, train into another folder "
                                 "(hydra.run.dir=...), or set on_config_change=new to train in a new folder next to "
                                 "it"])



class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, writing ``.<name>.<pid>.tmp`` then renaming it: a crash while saving leaves the
    previous checkpoint whole."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        if path.is_symlink():
            path.unlink()
        os.replace(tmp, path)
