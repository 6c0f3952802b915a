"""The weight-sync protocol: how a trained policy gets into every running rollout and judge engine.

A sender runs in the trainer's processes after an iteration's last optimizer step. Every rank calls
`send(...)` (gathering ZeRO-3 shards is a collective); rank 0 passes the full HF-named state dict, the other
ranks None. The sender holds the engines' Ray actor handles, which pickle, so it travels into the Ray Train
workers as it is. One module per transport (`psr_ray.weight_sync.make_sender` picks it):

- object_store.py: `ray.put` once, every engine loads the same object (CPU, and the fallback anywhere).
- cuda_ipc.py: CUDA IPC handles to tensors already on the GPU the engines share with the trainer (GPU only).
- nccl.py: vLLM's own weight-transfer API over an NCCL group, in buckets (GPU nodes apart; GPU only).

After a sync, `engine_versions` asks each engine which policy version it serves.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol


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


def state_dict_bytes(state_dict: dict[str, Any]) -> int:
    return sum(t.numel() * t.element_size() for t in state_dict.values())


def engine_versions(engines: list[Any]) -> list[int]:
    """The policy version each engine reports serving."""
    import ray

    return ray.get([e.policy_version.remote() for e in engines])


class Sender:
    """What every transport shares: the engines, a bucket size, and the report of a finished sync."""

    backend = ""

    def __init__(self, engines: list[Any], *, bucket_mb: int = 512):
        if not engines:
            raise ValueError("weight sync needs at least one engine")
        self.engines = list(engines)
        self.bucket_bytes = bucket_mb * 2**20

    def report(self, state_dict: dict[str, Any], *, policy_version: int, started: float) -> SyncReport:
        """The report of a sync of `state_dict` that began at `time.perf_counter()` == `started`."""
        return SyncReport(self.backend, policy_version, len(self.engines), len(state_dict),
                          state_dict_bytes(state_dict), time.perf_counter() - started)  # fmt: skip
