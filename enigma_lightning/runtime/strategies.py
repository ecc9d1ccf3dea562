"""Strategy for ``trainer=fsdp`` / ``trainer=fsdp_cpu``: FSDP2 (``torch.distributed.fsdp.fully_shard``) through
Lightning's ``ModelParallelStrategy``, data-parallel over every process.

The sharding itself is applied by the module (``EnigmaModule.configure_model``, :mod:`enigma_lightning.step.sharding`):
each module named in the model's ``_no_split_modules`` (the transformer blocks) becomes one FSDP unit, then the root.
Sharded checkpoints (a folder per checkpoint) are written whole or not at all
(:meth:`FullyShardedStrategy.save_checkpoint`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from lightning.pytorch.strategies import ModelParallelStrategy


class FullyShardedStrategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` with every process in one data-parallel (sharding) group: ``data_parallel_size =
    devices * num_nodes``, ``tensor_parallel_size = 1``. (Lightning's ``"auto"`` sizes would give one data-parallel
    rank per node and tensor parallelism across its devices, which the module does not apply: nothing would be
    sharded or synchronised, and no error raised.)"""

    def __init__(self, **kwargs: Any):
        for key in ("data_parallel_size", "tensor_parallel_size"):
            if key in kwargs:
                raise ValueError(f"trainer.strategy.{key} is set from trainer.devices and trainer.num_nodes "
                                 f"(every process shards the model; no tensor parallelism). Remove {key}")
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, **kwargs)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        """A sharded checkpoint is written into ``.<name>.partial`` beside its place, then renamed into place; a
        checkpoint of that name (``last.ckpt``, rewritten every n steps) is moved to ``.<name>.previous`` first and
        removed after. A crash while saving leaves the previous checkpoint whole (and, between the two renames,
        :func:`~enigma_lightning.runtime.sweeps.resume_checkpoint` finds it as ``.<name>.previous``)."""
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        partial = path.with_name(f".{path.name}.partial")
        previous = path.with_name(f".{path.name}.previous")
        if self.global_rank == 0 and partial.exists():  # left by a crash while saving
            shutil.rmtree(partial)
        self.barrier("checkpoint_partial")
        super().save_checkpoint(checkpoint, partial, storage_options)
        self.barrier("checkpoint_written")
        if self.global_rank == 0:
            if previous.exists():
                shutil.rmtree(previous)
            if path.is_symlink() or path.is_file():
                path.unlink()
            elif path.exists():
                os.replace(path, previous)
            os.replace(partial, path)
            shutil.rmtree(previous, ignore_errors=True)
        self.barrier("checkpoint_renamed")
