"""Strategy for ``trainer=fsdp`` / ``trainer=fsdp_cpu``: FSDP2 (``torch.distributed.fsdp.fully_shard``) through
Lightning's ``ModelParallelStrategy``, data-parallel over every process.

The sharding itself is applied by the module (``EnigmaModule.configure_model``, :mod:`enigma_lightning.step.sharding`):
each module named in the model's ``_no_split_modules`` (the transformer blocks) becomes one FSDP unit, then the root.
"""

from __future__ import annotations

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
