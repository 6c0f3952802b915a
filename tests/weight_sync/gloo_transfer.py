"""Test-only: vLLM's NCCL weight-transfer protocol on CPU, with gloo in place of NCCL's communicator.

Engine side: `engine_class()` is vLLM's own `NCCLWeightTransferEngine`, registered under `BACKEND`. Every line of
its protocol is vLLM's: the worker's rank (`worker_init_process_group`: dp index, TP rank, `rank_offset`), the
rendezvous (vLLM's `StatelessProcessGroup`, a TCPStore served by rank 0, the trainer), the packed bucketed
receive (`packed_nccl_broadcast_consumer`) and the worker's weight-update state machine around it. Only the
device boundary differs (`on_cpu`): `PyNcclCommunicator` becomes a gloo group on that store, CUDA streams no-ops,
the device index 0. `GlooEngineActor` is psr_ray's `EngineActor`, unchanged, in a process that registered it.

Sender side: `sender_on_gloo` runs psr_ray's own GPU calls (`nccl._open_group`, `_broadcast`, `_close_group`)
inside `on_cpu`, so the sender's group is the same gloo stand-in and its broadcast vLLM's packed producer.

A gloo group dropped by one rank closes its connections: a peer blocked in a broadcast fails at once
("Connection closed by peer"), where an NCCL peer would stay blocked until killed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any
from unittest import mock

import torch

from psr_ray.engines.actor import EngineActor
from psr_ray.weight_sync import nccl

BACKEND = "psr_test_gloo_nccl"
GROUP_TIMEOUT = timedelta(seconds=120)


class GlooCommunicator:
    """What vLLM's NCCL path uses of `PyNcclCommunicator` (`broadcast`, `destroy`), over gloo."""

    def __init__(self, host: str, port: int, rank: int, world_size: int):
        import torch.distributed as dist
        from vllm.distributed.utils import StatelessProcessGroup

        self.rank, self.world_size = rank, world_size
        self.rendezvous = StatelessProcessGroup.create(host=host, port=port, rank=rank, world_size=world_size)
        self._group: Any = dist.ProcessGroupGloo(
            dist.PrefixStore("gloo", self.rendezvous.store), rank, world_size, GROUP_TIMEOUT
        )
        self.fail_at_broadcast: int | None = None  # tests: this broadcast (1-based) raises instead of sending
        self.broadcasts = 0

    def broadcast(self, tensor: torch.Tensor, src: int, stream: Any = None) -> None:
        if self._group is None:
            raise RuntimeError("broadcast on a destroyed weight-transfer group")
        self.broadcasts += 1
        if self.broadcasts == self.fail_at_broadcast:
            raise RuntimeError(f"injected: the link failed at broadcast {self.broadcasts} ({tensor.numel()} bytes)")
        self._group.broadcast(tensor, src).wait()

    def destroy(self) -> None:
        self._group = None  # closes the gloo connections
        self.rendezvous = None  # type: ignore[assignment]


def _gloo_group(master_address: str, master_port: int, rank: int, world_size: int, device: Any) -> GlooCommunicator:
    """Stands in for vLLM's `nccl_common.stateless_init_process_group` (same arguments, same rendezvous)."""
    return GlooCommunicator(master_address, master_port, rank, world_size)


class _NoStream:
    def synchronize(self) -> None:
        pass


@contextmanager
def on_cpu() -> Iterator[None]:
    """The device boundary of vLLM's NCCL path, on CPU: gloo for NCCL, no-op streams, device index 0 (and
    psr_ray's `torch.cuda.current_device()` the CPU)."""
    from vllm.distributed.weight_transfer import nccl_common, packed_tensor

    with (
        mock.patch.object(nccl_common, "stateless_init_process_group", _gloo_group),
        mock.patch.object(packed_tensor, "_get_streams", lambda index, count: tuple(_NoStream() for _ in range(count))),
        mock.patch.object(torch.accelerator, "current_device_index", lambda: 0),
        mock.patch.object(torch.cuda, "current_device", lambda: "cpu"),
    ):
        yield


def engine_class() -> type:
    """vLLM's NCCL weight-transfer engine with its communicator and streams on CPU (`on_cpu`). Built on demand:
    collecting the tests must not import vLLM."""
    from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine

    class GlooNcclEngine(NCCLWeightTransferEngine):
        def init_transfer_engine(self, init_info: Any) -> None:
            with on_cpu():
                super().init_transfer_engine(init_info)

        def receive_weights(self, update_info: Any) -> None:
            with on_cpu():
                super().receive_weights(update_info)

    return GlooNcclEngine


def register() -> None:
    """Registers `engine_class()` as `BACKEND` in this process's vLLM (again: a no-op)."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    try:
        WeightTransferEngineFactory.register_engine(BACKEND, engine_class())
    except ValueError:  # already registered
        pass


class GlooEngineActor(EngineActor):
    """psr_ray's engine actor, unchanged, in a process where `BACKEND` is registered before vLLM builds it."""

    def __init__(self, settings: Any, **kwargs: Any):
        register()
        super().__init__(settings, **kwargs)


def sender_on_gloo(monkeypatch: Any, *, fail_at_broadcast: int | None = None) -> list[GlooCommunicator]:
    """psr_ray's NCCL sender's GPU calls, run as they are inside `on_cpu`; returns the groups it opens
    (`fail_at_broadcast`: each group's broadcast of that number raises, the buckets before it sent)."""
    opened: list[GlooCommunicator] = []
    open_group, broadcast, close_group = nccl._open_group, nccl._broadcast, nccl._close_group

    def open_on_cpu(*args: Any) -> Any:
        with on_cpu():
            group = open_group(*args)
        group.fail_at_broadcast = fail_at_broadcast
        opened.append(group)
        return group

    def broadcast_on_cpu(*args: Any, **kwargs: Any) -> None:
        with on_cpu():
            broadcast(*args, **kwargs)

    def close_on_cpu(group: Any) -> None:
        with on_cpu():
            close_group(group)

    monkeypatch.setattr(nccl, "_open_group", open_on_cpu)
    monkeypatch.setattr(nccl, "_broadcast", broadcast_on_cpu)
    monkeypatch.setattr(nccl, "_close_group", close_on_cpu)
    return opened
