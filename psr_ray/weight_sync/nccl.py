"""Weight sync over NCCL through vLLM's own weight-transfer API (GPU engines on other nodes). GPU only.

The trainer's rank 0 opens an NCCL group with every engine worker (vLLM's `NCCLTrainerWeightTransferEngine`,
engines built with `WeightTransferConfig(backend="nccl")`) and broadcasts the weights in packed buckets of
`weight_sync.bucket_mb`, never one RPC per parameter. The engines' actor methods `transfer_*` (receivers.py)
forward to `LLM.init_weight_transfer_engine` / `start_weight_update` / `update_weights` /
`finish_weight_update`. A fresh group per sync: the trainer group is a new Ray Train run each iteration.
Not exercised on the CPU machines (no NCCL there); see tests/test_weight_sync.py for what is.
"""

from __future__ import annotations

import time
from typing import Any

from psr_ray.config import WeightSyncBackend
from psr_ray.weight_sync.base import Sender, SyncReport


class _EngineClient:
    """vLLM's `VLLMWeightSyncClient` shape over our engine actors (whose own `update_weights` is taken)."""

    def __init__(self, engines: list[Any], policy_version: int):
        self.engines = engines
        self.policy_version = policy_version

    def _all(self, method: str, *args: Any) -> None:
        import ray

        ray.get([getattr(e, method).remote(*args) for e in self.engines])

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self._all("transfer_init", init_info)

    def start_weight_update(self) -> None:
        self._all("transfer_start")

    def update_weights(self, update_info: dict[str, Any]) -> None:
        self._all("transfer_receive", update_info)

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._all("transfer_finish", self.policy_version)

    def shutdown_weight_transfer_engine(self) -> None:
        self._all("transfer_shutdown")


def _state_dict_source(state_dict: dict[str, Any]) -> Any:
    import torch
    from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

    class StateDictSource(WeightSource):
        # The ZeRO-3 gather already ran on every rank; rank 0 alone streams its full copy to the GPU.
        def metadata(self) -> list[ParamMeta]:
            return [ParamMeta(n, t.dtype, tuple(t.shape)) for n, t in state_dict.items()]

        def __iter__(self):
            for name, tensor in state_dict.items():
                yield name, tensor.to(torch.cuda.current_device(), non_blocking=True)

    return StateDictSource()


class NcclSender(Sender):
    backend = WeightSyncBackend.NCCL

    def send(self, state_dict: dict[str, Any] | None, *, policy_version: int) -> SyncReport | None:
        if state_dict is None:
            return None
        import ray
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo, NCCLTrainerWeightTransferEngine

        started = time.perf_counter()
        engines = self.engines
        workers_per_engine = ray.get([e.transfer_world_size.remote() for e in engines])
        init = NCCLTrainerInitInfo(
            master_address=ray.util.get_node_ip_address(),
            master_port=_free_port(),
            world_size=1 + sum(workers_per_engine),
            packed=True,
            packed_buffer_size_bytes=self.bucket_bytes,
            rank=0,
        )
        client = _EngineClient(engines, policy_version)
        sender = NCCLTrainerWeightTransferEngine.trainer_init(init, client=client, source=_state_dict_source(state_dict))
        try:
            sender.send_weights()  # start -> update (concurrent with the broadcast) -> finish
        finally:
            sender.shutdown()
            client.shutdown_weight_transfer_engine()
        return self.report(state_dict, policy_version=policy_version, started=started)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]
