"""The product's worker loop with a recorder around the held-out forward, for test_zero3_partitioned.py.

A module of its own because Ray workers cannot import test modules: the test registers this one to be
pickled by value (heavy imports stay inside the functions, see trainer_probe.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def recording_loop(out_dir: str, *, zero_overrides: dict[str, int]) -> Any:
    """`trainer.worker.train_loop_per_worker` with `zero_overrides` in DeepSpeed's zero_optimization and
    each rank's parameter state written to `out_dir/rank{r}.pt` around the held-out forward: per parameter
    (ds_numel, local numel, partition numel, persistent), the rank's partitions (the trained weights), and the
    parameters in flight after the held-out forward."""

    def loop(loop_config: dict[str, Any]) -> None:
        import torch
        import torch.distributed as dist

        from psr_ray.trainer import deepspeed_zero, heldout
        from psr_ray.trainer.worker import train_loop_per_worker

        ds_config, heldout_metrics = deepspeed_zero.ds_config, heldout.heldout_metrics

        def scaled_ds_config(*args: Any, **kwargs: Any) -> dict[str, Any]:
            config = ds_config(*args, **kwargs)
            config["zero_optimization"] |= zero_overrides
            return config

        def recorded_heldout(policy: Any, *args: Any, **kwargs: Any) -> dict[str, float]:
            params = list(policy.module.named_parameters())
            record: dict[str, Any] = {
                "params": {n: (p.ds_numel, p.numel(), p.ds_tensor.numel(), p.ds_persist) for n, p in params},
                "partitions": {n: p.ds_tensor.detach().clone() for n, p in params},
            }
            metrics = heldout_metrics(policy, *args, **kwargs)
            record["in_flight"] = [n for n, p in params if p.ds_status.name == "INFLIGHT"]
            torch.save(record, Path(out_dir) / f"rank{dist.get_rank()}.pt")
            return metrics

        deepspeed_zero.ds_config, heldout.heldout_metrics = scaled_ds_config, recorded_heldout
        train_loop_per_worker(loop_config)

    return loop
