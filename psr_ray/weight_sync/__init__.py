"""Weight sync: how a trained policy gets into every running rollout and judge engine (see `base.py`).

The loop builds one sender per iteration (`sender_for`) and hands it to the trainer; after training every
trainer rank calls `push` (the sync step, timed); the loop's sync stage (pipeline/sync_stage.py) then checks
that every engine serves the new policy and completes the sync from the export where one does not.
"""

from __future__ import annotations

from typing import Any

from psr_ray.config import PSRConfig, WeightSyncBackend
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
    "push",
    "resolve_backend",
    "sender_for",
]


def sender_for(cfg: PSRConfig, engines: list[Any], *, probe: ProbeSpec, restore_dir: str | None) -> WeightSender:
    """The sender of `cfg`'s transport (`backend_for`) for these engine actor handles, with its bucket size
    and timeout; `probe` and `restore_dir` as in `make_sender`."""
    return make_sender(backend_for(cfg), engines, probe=probe, restore_dir=restore_dir,
                       bucket_mb=cfg.weight_sync.bucket_mb, timeout_s=cfg.weight_sync.timeout_s)  # fmt: skip


def push(sender: WeightSender, state_dict: dict[str, Any] | None, *, policy_version: int) -> SyncReport | None:
    """The sync step, run on every trainer rank after training: `sender.send` (rank 0 gives the full
    {HF name: CPU tensor} weights, the other ranks None), timed (runtime.metrics `weight_sync_seconds`).
    Rank 0 gets the report; then the `sync.after_push` kill window (the weights are in the engines, no
    checkpoint says so yet)."""
    from psr_ray.runtime import kill_windows
    from psr_ray.runtime.metrics import timed_weight_sync

    report: SyncReport | None = timed_weight_sync(sender.send, backend=str(sender.backend))(
        state_dict, policy_version=policy_version
    )
    if state_dict is not None:
        kill_windows.reached("sync.after_push")
    return report


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
