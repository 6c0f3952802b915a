"""Which transport a topology can run: where the trainer's rank 0 and every engine worker sit. Pure."""

from __future__ import annotations

from typing import Any

from psr_ray.config.sections import WeightSyncBackend


def resolve_backend(
    backend: WeightSyncBackend | str,
    *,
    trainer_gpu: bool,
    engines_gpu: bool,
    engines_own_gpus: bool,
    colocate: bool,
) -> WeightSyncBackend:
    """The transport for a topology. NCCL refuses two ranks on one GPU, so it needs trainer rank 0 and
    every engine worker on a GPU of its own (`engines_own_gpus`: whole GPUs per worker, not colocated);
    engines sharing the trainer's GPU (`colocate`) use CUDA IPC; anything else, the object store.
    `auto` picks that way; an explicit choice the topology cannot run is a ValueError naming the field."""
    backend = WeightSyncBackend(backend)
    on_gpus = trainer_gpu and engines_gpu
    if colocate and not on_gpus:
        raise ValueError("weight_sync.colocate needs a GPU trainer (trainer.use_gpu) and GPU engines "
                         "(rollout/judge.num_gpus_per_engine > 0)")  # fmt: skip
    nccl_ok = on_gpus and engines_own_gpus and not colocate
    if backend is WeightSyncBackend.AUTO:
        if colocate:
            return WeightSyncBackend.CUDA_IPC
        return WeightSyncBackend.NCCL if nccl_ok else WeightSyncBackend.OBJECT_STORE
    if backend is WeightSyncBackend.NCCL and not nccl_ok:
        raise ValueError(
            "weight_sync.backend=nccl needs a GPU trainer and engines with whole GPUs of their own "
            "(NCCL refuses two ranks on one GPU); use cuda_ipc with weight_sync.colocate, or object_store"
        )
    if backend is WeightSyncBackend.CUDA_IPC and not colocate:
        raise ValueError("weight_sync.backend=cuda_ipc needs the engines on the trainer's GPU: set "
                         "weight_sync.colocate=true, or use nccl / object_store")  # fmt: skip
    return backend


def backend_for(cfg: Any) -> WeightSyncBackend:
    """The transport a `PSRConfig` resolves to."""
    pools = (cfg.rollout, cfg.judge)
    return resolve_backend(
        cfg.weight_sync.backend,
        trainer_gpu=cfg.trainer.use_gpu,
        engines_gpu=all(p.num_gpus_per_engine > 0 for p in pools),
        # Engines with tensor parallelism get one whole-GPU bundle per worker (engines/pool.py).
        engines_own_gpus=all(p.tensor_parallel_size > 1 or p.num_gpus_per_engine >= 1 for p in pools),
        colocate=cfg.weight_sync.colocate,
    )
