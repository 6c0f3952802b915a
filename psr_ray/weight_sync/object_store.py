"""Weight sync through the Ray object store: one `ray.put`, every engine loads the same object in place.

Works anywhere (CPU engines, GPU engines, other nodes); costs a host copy and a transfer per node. The
engines' `update_weights` reloads through the vLLM worker extension, keeping KV cache and scheduler.
"""

from __future__ import annotations

from typing import Any

from psr_ray.weight_sync.base import Stopwatch, SyncReport, engine_handles, state_dict_bytes


class ObjectStoreSender:
    backend = "object_store"

    def __init__(self, engine_names: list[str], *, namespace: str | None = None):
        if not engine_names:
            raise ValueError("weight sync needs at least one engine name")
        self.engine_names = list(engine_names)
        self.namespace = namespace

    def send(self, state_dict: dict[str, Any] | None, *, policy_version: int) -> SyncReport | None:
        if state_dict is None:  # not rank 0: nothing to send, the gather already happened
            return None
        import ray

        clock = Stopwatch()
        # Contiguous CPU tensors: the object store then shares one buffer with every engine on this node.
        ref = ray.put({name: t.detach().to("cpu").contiguous() for name, t in state_dict.items()})
        engines = engine_handles(self.engine_names, self.namespace)
        counts = ray.get([e.update_weights.remote(ref, policy_version=policy_version) for e in engines])
        if any(count != len(state_dict) for count in counts):
            raise RuntimeError(f"engines loaded {counts} tensors, expected {len(state_dict)} each")
        return SyncReport(
            backend=self.backend,
            policy_version=policy_version,
            num_engines=len(engines),
            num_tensors=len(state_dict),
            num_bytes=state_dict_bytes(state_dict),
            seconds=clock.seconds(),
        )
