"""Weight sync: how a trained policy gets into every running rollout and judge engine (see `base.py`)."""

from __future__ import annotations

from typing import Any

from psr_ray.config import WeightSyncBackend
from psr_ray.weight_sync.base import SyncReport, WeightSender, engine_versions

__all__ = ["SyncReport", "WeightSender", "backend_for", "engine_versions", "make_sender", "resolve_backend"]


def resolve_backend(
    backend: WeightSyncBackend, *, trainer_gpu: bool, engines_gpu: bool, colocated: bool
) -> WeightSyncBackend:
    """`auto` -> cuda_ipc when trainer and engines share GPUs, nccl for GPUs apart, object_store otherwise."""
    backend = WeightSyncBackend(backend)
    if backend is not WeightSyncBackend.AUTO:
        gpu_only = (WeightSyncBackend.CUDA_IPC, WeightSyncBackend.NCCL)
        if backend in gpu_only and not (trainer_gpu and engines_gpu):
            raise ValueError(f"weight_sync.backend={backend} needs GPU trainer and GPU engines; use object_store")
        return backend
    if trainer_gpu and engines_gpu:
        return WeightSyncBackend.CUDA_IPC if colocated else WeightSyncBackend.NCCL
    return WeightSyncBackend.OBJECT_STORE


def backend_for(cfg: Any) -> WeightSyncBackend:
    """The transport a `PSRConfig` resolves to. Colocation (engines on the trainer's GPUs) is not a config
    option yet, so GPU engines apart from GPU trainers use NCCL."""
    engines_gpu = cfg.rollout.num_gpus_per_engine > 0 and cfg.judge.num_gpus_per_engine > 0
    return resolve_backend(cfg.weight_sync.backend, trainer_gpu=cfg.trainer.use_gpu, engines_gpu=engines_gpu,
                           colocated=False)  # fmt: skip


def make_sender(backend: WeightSyncBackend, engines: list[Any], *, bucket_mb: int = 512) -> WeightSender:
    """The sender of a resolved transport, for these engine actor handles."""
    try:
        backend = WeightSyncBackend(backend)
    except ValueError:
        choices = ", ".join(b.value for b in WeightSyncBackend if b is not WeightSyncBackend.AUTO)
        raise ValueError(f"unknown weight-sync backend {backend!r}; choose one of {choices}") from None
    if backend is WeightSyncBackend.OBJECT_STORE:
        from psr_ray.weight_sync.object_store import ObjectStoreSender

        return ObjectStoreSender(engines, bucket_mb=bucket_mb)
    if backend is WeightSyncBackend.CUDA_IPC:
        from psr_ray.weight_sync.cuda_ipc import CudaIpcSender

        return CudaIpcSender(engines, bucket_mb=bucket_mb)
    if backend is WeightSyncBackend.NCCL:
        from psr_ray.weight_sync.nccl import NcclSender

        return NcclSender(engines, bucket_mb=bucket_mb)
    raise ValueError(f"weight sync needs a resolved backend, not {backend}; call resolve_backend first")
