"""Weight sync through the Ray object store: one `ray.put`, every engine loads the same object in place.

Works anywhere (CPU engines, GPU engines, other nodes); costs a host copy and a transfer per node. The
engines' `update_weights` reloads through the vLLM worker extension, keeping KV cache and scheduler.
"""

from __future__ import annotations

import time
from typing import Any

from psr_ray.config import WeightSyncBackend
from psr_ray.weight_sync.base import Sender, SyncReport


class ObjectStoreSender(Sender):
    backend = WeightSyncBackend.OBJECT_STORE

    def send(self, state_dict: dict[str, Any] | None, *, policy_version: int) -> SyncReport | None:
        if state_dict is None:  # not rank 0: nothing to send, the gather already happened
            return None
        import ray

        started = time.perf_counter()
        # Contiguous CPU tensors: the object store then shares one buffer with every engine on this node.
        ref = ray.put({name: t.detach().to("cpu").contiguous() for name, t in state_dict.items()})
        counts = ray.get([e.update_weights.remote(ref, policy_version=policy_version) for e in self.engines])
        if any(count != len(state_dict) for count in counts):
            raise RuntimeError(f"engines loaded {counts} tensors, expected {len(state_dict)} each")
        return self.report(state_dict, policy_version=policy_version, started=started)
