"""How Ray Train hands the "pairs" dataset to the trainer workers: split without dropping a row.

Ray Train's default `DataConfig` splits with `streaming_split(world_size, equal=True)`, which drops up to
world_size - 1 rows so every worker sees the same count. Every committed pair must be trained, so the split
here is `equal=False`; it deals whole blocks (the streamed pairs dataset emits one-row blocks) and workers
may get different counts, which the worker loop evens out with zero-weight micro-steps (`worker.py`).
Runs in Ray Train's dataset manager actor, which unpickles it: it lives in an importable module.
"""

from __future__ import annotations

from typing import Any

import ray.train


class UnequalSplitDataConfig(ray.train.DataConfig):
    """`DataConfig.configure` with `equal=False`; everything else as Ray Train 2.60 does it."""

    def configure(
        self,
        datasets: dict[str, Any],
        world_size: int,
        worker_handles: Any,
        worker_node_ids: Any,
        **kwargs: Any,
    ) -> list[dict[str, Any]]:
        output: list[dict[str, Any]] = [{} for _ in range(world_size)]
        to_split = set(datasets) if self._datasets_to_split == "all" else set(self._datasets_to_split)
        hints = worker_node_ids if self._enable_shard_locality else None
        for name, ds in datasets.items():
            if ds.name is None:
                ds.set_name(name)
            ds = ds.copy(ds)
            ds.context.execution_options = self._resolve_execution_options(name)
            if name in to_split:
                for i, split in enumerate(ds.streaming_split(world_size, equal=False, locality_hints=hints)):
                    output[i][name] = split
            else:
                for i in range(world_size):
                    output[i][name] = ds.iterator()
        return output
