"""Weight sync: how a trained policy gets into every running rollout and judge engine (see `base.py`)."""

from __future__ import annotations

from typing import Any

from psr_ray.config import WeightSyncBackend
from psr_ray.config.topology import backend_for, resolve_backend
from psr_ray.weight_sync.base import SyncError, SyncReport, WeightSender, engine_versions
from psr_ray.weight_sync.probe import ProbeSpec

__all__ = [
    "ProbeSpec",
    "SyncError",
    "SyncReport",
    "WeightSender",
    "backend_for",
    "engine_versions",
    "make_sender",
    "resolve_backend",
]


def make_sender(
    backend: WeightSyncBackend | str,
    engines: list[Any],
    *,
    probe: ProbeSpec,
    restore_dir: str | None,
    bucket_mb: int = 512,
    timeout_s: float = 600.0,
) -> WeightSender:
    """The sender of a resolved transport for these engine actor handles. `probe` checks every engine
    after the sync; `restore_dir` holds the weights the engines serve now (what a failed sync restores)."""
    try:
        backend = WeightSyncBackend(backend)
    except ValueError:
        choices = ", ".join(b.value for b in WeightSyncBackend if b is not WeightSyncBackend.AUTO)
        raise ValueError(f"unknown weight-sync backend {backend!r}; choose one of {choices}") from None
    sender: type[Any]
    if backend is WeightSyncBackend.OBJECT_STORE:
        from psr_ray.weight_sync.object_store import ObjectStoreSender as sender
    elif backend is WeightSyncBackend.CUDA_IPC:
        from psr_ray.weight_sync.cuda_ipc import CudaIpcSender as sender
    elif backend is WeightSyncBackend.NCCL:
        from psr_ray.weight_sync.nccl import NcclSender as sender
    else:
        raise ValueError(f"weight sync needs a resolved backend, not {backend}; call resolve_backend first")
    made: WeightSender = sender(engines, probe=probe, restore_dir=restore_dir, bucket_mb=bucket_mb, timeout_s=timeout_s)
    return made
