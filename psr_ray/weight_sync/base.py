"""The weight-sync protocol: how a trained policy gets into every running rollout and judge engine.

A sender runs in the trainer's processes after an iteration's last optimizer step. Every rank calls
`send(...)` (gathering ZeRO-3 shards is a collective); rank 0 passes the full HF-named state dict, the other
ranks None. Engines are found by their Ray actor names, so the sender is a small picklable object that can
travel into the Ray Train workers. One module per transport:

- object_store.py: `ray.put` once, every engine loads the same object (CPU, and the fallback anywhere).
- cuda_ipc.py: CUDA IPC handles to tensors already on the GPU the engines share with the trainer (GPU only).
- nccl.py: vLLM's own weight-transfer API over an NCCL group, in buckets (GPU nodes apart; GPU only).

After a sync, `engine_versions` asks each engine which policy version it serves.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

TRANSPORTS = ("object_store", "cuda_ipc", "nccl")


@dataclass(frozen=True)
class SyncReport:
    backend: str
    policy_version: int
    num_engines: int
    num_tensors: int
    num_bytes: int
    seconds: float

    @property
    def gbytes_per_s(self) -> float:
        return self.num_bytes / 1e9 / self.seconds if self.seconds > 0 else float("inf")


class WeightSender(Protocol):
    backend: str

    def send(self, state_dict: dict[str, Any] | None, *, policy_version: int) -> SyncReport | None:
        """Called on every trainer rank; rank 0 gives the full state dict and gets the report."""


def resolve_backend(backend: str, *, trainer_gpu: bool, engines_gpu: bool, colocated: bool) -> str:
    """`auto` -> cuda_ipc when trainer and engines share GPUs, nccl for GPUs apart, object_store otherwise."""
    if backend != "auto":
        if backend in ("cuda_ipc", "nccl") and not (trainer_gpu and engines_gpu):
            raise ValueError(f"weight_sync.backend={backend} needs GPU trainer and GPU engines; use object_store")
        return backend
    if trainer_gpu and engines_gpu:
        return "cuda_ipc" if colocated else "nccl"
    return "object_store"


def backend_for(cfg: Any) -> str:
    """The transport a `PSRConfig` resolves to. Colocation (engines on the trainer's GPUs) is not a config
    option yet, so GPU engines apart from GPU trainers use NCCL."""
    engines_gpu = cfg.rollout.num_gpus_per_worker > 0 and cfg.judge.num_gpus_per_worker > 0
    return resolve_backend(cfg.weight_sync.backend, trainer_gpu=cfg.trainer.use_gpu, engines_gpu=engines_gpu,
                           colocated=False)


def make_sender(backend: str, engine_names: list[str], *, bucket_mb: int = 512, namespace: str | None = None) -> WeightSender:
    if backend == "object_store":
        from psr_ray.weight_sync.object_store import ObjectStoreSender

        return ObjectStoreSender(engine_names, namespace=namespace)
    if backend == "cuda_ipc":
        from psr_ray.weight_sync.cuda_ipc import CudaIpcSender

        return CudaIpcSender(engine_names, bucket_mb=bucket_mb, namespace=namespace)
    if backend == "nccl":
        from psr_ray.weight_sync.nccl import NcclSender

        return NcclSender(engine_names, bucket_mb=bucket_mb, namespace=namespace)
    raise ValueError(f"unknown weight-sync backend {backend!r}; choose one of {TRANSPORTS}")


def engine_handles(engine_names: list[str], namespace: str | None = None) -> list[Any]:
    import ray

    return [ray.get_actor(name, namespace=namespace) for name in engine_names]


def engine_versions(engines: list[Any]) -> list[int]:
    """The policy version each engine reports serving."""
    import ray

    return ray.get([e.policy_version.remote() for e in engines])


def state_dict_bytes(state_dict: dict[str, Any]) -> int:
    return sum(t.numel() * t.element_size() for t in state_dict.values())


class GpuSender:
    """What the GPU transports share: engines by name, a bucket size, and the report of a finished sync."""

    backend = ""

    def __init__(self, engine_names: list[str], *, bucket_mb: int = 512, namespace: str | None = None):
        self.engine_names = list(engine_names)
        self.bucket_bytes = bucket_mb * 2**20
        self.namespace = namespace

    def report(self, state_dict: dict[str, Any], *, policy_version: int, num_engines: int, seconds: float) -> SyncReport:
        return SyncReport(self.backend, policy_version, num_engines, len(state_dict), state_dict_bytes(state_dict), seconds)


class Stopwatch:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self.start
