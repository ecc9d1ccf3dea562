"""Data: CoT-Collection-schema datasets through ``datasets``, with a bundled offline default.

Rows carry ``source`` (question), ``rationale``, ``target`` (answer), ``task`` and ``type``; other schemas are
mapped with ``columns``. ``path`` is ``bundled`` (ships with the package), a local json/jsonl/parquet/csv file or
folder, or a hub id (``kaist-ai/CoT-Collection``) loaded with ``datasets.load_dataset`` unchanged.

Batches are drawn by :class:`StepBatchSampler`: the prompts of optimisation step ``k`` depend only on ``(seed, k)``,
so a run resumed from a checkpoint at step ``k`` sees exactly the prompts the uninterrupted run would have seen.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import DataError, EnigmaError

REQUIRED = ("source", "target")
SCHEMA = ("source", "rationale", "target", "task", "type")
LOCAL_SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def bundled_path(split: str = "train") -> Path:
    return Path(__file__).parent / "assets" / f"arithmetic_{split}.jsonl"


def resolve_data_path(path: str) -> str:
    """``bundled`` (the training file) and ``bundled_eval`` (the held-out split) name the bundled files."""
    return {"bundled": str(bundled_path("train")), "bundled_eval": str(bundled_path("eval"))}.get(path, path)


def is_local_data(path: str) -> bool:
    p = Path(path).expanduser()
    return p.suffix in LOCAL_SUFFIXES or path.startswith(("/", "./", "../", "~")) or p.exists()


def load_rows(path: str, split: str = "train", name: str | None = None, revision: str | None = None,
              key: str = "data.path") -> list[dict]:
    """Load a dataset as a list of dicts through ``datasets``; local files are checked first (:mod:`.files`)."""
    import datasets

    from .files import check_file, local_files

    path = resolve_data_path(path)
    if is_local_data(path):
        files = local_files(Path(path).expanduser(), key, LOCAL_SUFFIXES)
        for f in files:
            check_file(f, key)
        try:
            ds = datasets.load_dataset(LOCAL_SUFFIXES[files[0].suffix], data_files=[str(f) for f in files],
                                       split="train")
        except Exception as e:
            raise DataError(f"{key}: {path} could not be read ({type(e).__name__}: {str(e).splitlines()[0]}). "
                            "Check the file's format (json lines, csv with a header, parquet)") from e
    else:
        try:
            ds = datasets.load_dataset(path, name, split=split, revision=revision)
        except Exception as e:
            import os

            offline = " HF_DATASETS_OFFLINE=1 is set and it is not in the local cache;" \
                if os.environ.get("HF_DATASETS_OFFLINE") == "1" else ""
            raise DataError(f"{key}={path!r} (a hub dataset id) could not be loaded:{offline} "
                            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. Either point {key} at "
                            "a local json/jsonl/parquet/csv file, or allow the network (unset HF_DATASETS_OFFLINE)"
                            ) from e
    return ds.to_list()


def _is_text(value, key: str) -> bool:
    """Fields are text; an answer (``target``) may also be a number."""
    if isinstance(value, str):
        return True
    return key == "target" and isinstance(value, int | float) and not isinstance(value, bool)


def check_rows(rows: list[dict], where: str, on_bad_rows: str = "error") -> tuple[list[dict], list[str]]:
    """Return the good rows and one message per bad row. Raise on bad rows unless ``on_bad_rows == 'skip'``."""
    problems: list[str] = []
    good: list[dict] = []
    for i, row in enumerate(rows):
        missing = [k for k in REQUIRED if row.get(k) is None]  # datasets fills absent keys with None
        not_text = [k for k in SCHEMA if row.get(k) is not None and not _is_text(row[k], k)]
        empty = [k for k in REQUIRED if k not in missing + not_text and not str(row[k]).strip()]
        if missing or empty or not_text:
            parts = [f"missing field {k!r}" for k in missing] + [f"empty {k!r}" for k in empty]
            parts += [f"field {k!r} is a {type(row[k]).__name__}, not text" for k in not_text]
            problems.append(f"row {i}: " + ", ".join(parts))
        else:
            good.append(row)
    if problems and on_bad_rows != "skip":
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise DataError(
            f"{len(problems)} bad row(s) in {where}:\n  {shown}\n"
            "Fix or remove these rows, or set data.on_bad_rows=skip to drop them with a warning."
        )
    return good, problems


class RowDataset(Dataset):
    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


class StepBatchSampler(Sampler[list[int]]):
    """Infinite stream of batches; the batch of step ``k`` is a function of ``(seed, k)`` only.

    Epoch ``e`` is a permutation seeded by ``seed + e``; ``start_step`` skips to a resumed step. With
    ``world_size`` ranks, step ``k`` draws ``batch_size * world_size`` prompts and rank ``r`` takes the ``r``-th
    slice of ``batch_size``: whole prompts per rank, and the global batch is the one a single process would draw
    with ``batch_size * world_size``.
    """

    def __init__(self, num_rows: int, batch_size: int, seed: int, start_step: int = 0, rank: int = 0,
                 world_size: int = 1):
        total = batch_size * world_size
        if num_rows < total:
            raise DataError(
                f"The training split has {num_rows} rows but one step needs {total} prompts "
                f"({batch_size} per rank x {world_size} ranks). Lower data.batch_size or use more data (data.limit)."
            )
        self.num_rows, self.batch_size, self.seed, self.start_step = num_rows, batch_size, seed, start_step
        self.rank, self.world_size = rank, world_size
        self.per_epoch = num_rows // total

    def batch(self, step: int) -> list[int]:
        epoch, j = divmod(step, self.per_epoch)
        perm = list(range(self.num_rows))
        random.Random(self.seed + epoch).shuffle(perm)
        total = self.batch_size * self.world_size
        start = j * total + self.rank * self.batch_size
        return perm[start : start + self.batch_size]

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while True:
            yield self.batch(step)
            step += 1


def collate(rows: list[dict]) -> dict[str, list]:
    keys = rows[0].keys()
    return {k: [r.get(k) for r in rows] for k in keys}


class CoTDataModule(L.LightningDataModule):
    """Prompts for GRPO (defaults: ``conf/data/bundled.yaml``). ``batch_size`` counts completions per step and per rank (as TRL's per-device batch does):
    each step draws ``batch_size // num_generations`` prompts per rank and samples ``num_generations`` completions
    each. Batches are drawn by :class:`StepBatchSampler`, which also splits them across ranks (the trainer presets
    set ``use_distributed_sampler: false`` so Lightning leaves it alone)."""

    def __init__(
        self,
        *,
        path: str,
        val_path: str | None,
        val_split: str | None,
        val_size: int,
        limit: int | None,
        tasks: list[str] | None,
        columns: dict[str, str] | None,
        batch_size: int,
        num_generations: int,
        val_batch_size: int,
        seed: int,
        on_bad_rows: str,
        num_workers: int,
        name: str | None = None,  # a hub dataset's configuration (conf/data/cot_collection.yaml sets these three)
        split: str = "train",
        revision: str | None = None,
    ):
        super().__init__()
        self.path, self.name, self.split, self.revision = path, name, split, revision
        self.val_path, self.val_split, self.val_size = val_path, val_split, val_size
        self.limit, self.tasks, self.columns = limit, list(tasks) if tasks else None, dict(columns or {})
        self.batch_size, self.num_generations, self.val_batch_size = batch_size, num_generations, val_batch_size
        self.seed, self.on_bad_rows, self.num_workers = seed, on_bad_rows, num_workers
        self.train_rows: list[dict] = []
        self.val_rows: list[dict] = []
        self.start_step = 0

    @property
    def prompts_per_step(self) -> int:
        return self.batch_size // self.num_generations

    def _prepare(self, rows: list[dict], where: str) -> list[dict]:
        from .files import column_problem

        if problem := column_problem(rows, self.columns, where, REQUIRED, SCHEMA):
            raise DataError(problem)
        if self.columns:
            rows = [{**r, **{ours: r.get(theirs) for ours, theirs in self.columns.items()}} for r in rows]
        rows, problems = check_rows(rows, where, self.on_bad_rows)
        if problems:
            import logging

            logging.getLogger(__name__).warning("Skipped %d bad rows in %s: %s", len(problems), where, problems[:10])
        if self.tasks:
            rows = [r for r in rows if r.get("task") in self.tasks]
            if not rows:
                raise DataError(f"data.tasks={self.tasks} matches no row in {where}. Check the `task` values.")
        return [{k: r.get(k) for k in SCHEMA} for r in rows]

    def setup(self, stage: str | None = None) -> None:
        if self.train_rows:
            return
        where = f"data.path={self.path!r}"
        rows = self._prepare(load_rows(self.path, self.split, self.name, self.revision), where)
        if not rows:
            raise DataError(f"{where} has no usable rows. Point data.path at a file with rows (source, target)")
        random.Random(self.seed).shuffle(rows)
        if self.val_path or self.val_split:
            vwhere = f"data.val_path={self.val_path or self.path!r}"
            val = load_rows(self.val_path or self.path, self.val_split or "validation", self.name, self.revision,
                            key="data.val_path" if self.val_path else "data.path")
            self.val_rows = self._prepare(val, vwhere)[: self.val_size]
        elif self.val_size:
            if len(rows) <= self.val_size:
                raise DataError(f"{where} has {len(rows)} rows, too few to hold out data.val_size={self.val_size} "
                                f"for validation. Set data.val_size={len(rows) // 4} (or 0), or add rows")
            self.val_rows, rows = rows[: self.val_size], rows[self.val_size :]
        self.train_rows = rows[: self.limit] if self.limit else rows

    def state_dict(self) -> dict:
        return {"seed": self.seed, "num_train_rows": len(self.train_rows)}

    def train_dataloader(self) -> DataLoader:
        start = self.trainer.global_step if self.trainer is not None else self.start_step
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        sampler = StepBatchSampler(len(self.train_rows), self.prompts_per_step, self.seed, start_step=start,
                                   rank=rank, world_size=world)
        return DataLoader(
            RowDataset(self.train_rows), batch_sampler=sampler, collate_fn=collate, num_workers=self.num_workers
        )

    def val_dataloader(self) -> DataLoader:
        if not self.val_rows:
            return []
        sampler = None
        if self.trainer is not None and self.trainer.world_size > 1:  # each rank validates its share
            from torch.utils.data import DistributedSampler

            sampler = DistributedSampler(RowDataset(self.val_rows), num_replicas=self.trainer.world_size,
                                         rank=self.trainer.global_rank, shuffle=False)
        return DataLoader(RowDataset(self.val_rows), batch_size=self.val_batch_size, collate_fn=collate,
                          sampler=sampler)


def check_data_source(path: str) -> str | None:
    """A config problem for ``data.path`` if it is a missing local file, else None (hub ids are not checked)."""
    path = resolve_data_path(path)
    if is_local_data(path) and not Path(path).expanduser().exists():
        return (
            f"data.path: file {path!r} does not exist. Point data.path at a local json/jsonl/parquet/csv file, "
            "a hub dataset id, or `bundled`."
        )
    return None


__all__ = ["CoTDataModule", "StepBatchSampler", "load_rows", "check_rows", "bundled_path", "EnigmaError"]
