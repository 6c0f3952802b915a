"""Weight sync through CUDA IPC handles: engines on the trainer's GPUs map its tensors, no copy through the
host. GPU only (measured on one H100: 492 MB in 0.03 s vs 2.7 s through the object store).

The sender moves each bucket of weights onto its GPU (a no-op for tensors already there), creates IPC handles
with `torch.multiprocessing.reductions.reduce_tensor`, and every engine rebuilds the tensors on its own device
(`WeightSyncExtension.load_hf_weights_from_ipc`) and loads them in place. Buckets of `weight_sync.bucket_mb`
bound the extra GPU memory a sync needs. The sender keeps each bucket alive until all engines have loaded it.
"""

from __future__ import annotations

import time
from typing import Any

from psr_ray.config import WeightSyncBackend
from psr_ray.weight_sync.base import Sender, SyncReport


def buckets(state_dict: dict[str, Any], bucket_bytes: int) -> list[list[str]]:
    """Names grouped in order into buckets of at most `bucket_bytes` (a larger tensor gets its own)."""
    out: list[list[str]] = [[]]
    size = 0
    for name, tensor in state_dict.items():
        nbytes = tensor.numel() * tensor.element_size()
        if out[-1] and size + nbytes > bucket_bytes:
            out.append([])
            size = 0
        out[-1].append(name)
        size += nbytes
    return [b for b in out if b]


class CudaIpcSender(Sender):
    backend = WeightSyncBackend.CUDA_IPC

    def send(self, state_dict: dict[str, Any] | None, *, policy_version: int) -> SyncReport | None:
        if state_dict is None:
            return None
        import ray
        import torch
        from torch.multiprocessing.reductions import reduce_tensor

        started = time.perf_counter()
        engines = self.engines
        device = torch.cuda.current_device()
        groups = buckets(state_dict, self.bucket_bytes)
        for index, names in enumerate(groups):
            on_gpu = {n: state_dict[n].to(device, non_blocking=True).contiguous() for n in names}
            torch.cuda.synchronize(device)
            handles = {n: reduce_tensor(t) for n, t in on_gpu.items()}
            last = index == len(groups) - 1
            ray.get([
                e.update_weights_from_ipc.remote(handles, policy_version=policy_version if last else None)
                for e in engines
            ])
            del on_gpu  # engines copied out of the mapped memory inside reload_weights
        return self.report(state_dict, policy_version=policy_version, started=started)
