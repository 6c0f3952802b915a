"""Which transport each layout gets, NCCL rank offsets checked with vLLM's own rank formula, and CUDA IPC's
GPU matching by UUID. Pure (vLLM's NCCL helper runs with its process-group call replaced: no GPU here)."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest

from psr_ray import config as C
from psr_ray.config import WeightSyncBackend as B
from psr_ray.pipeline import preflight
from psr_ray.weight_sync import backend_for, make_sender, push, resolve_backend, sender_for
from psr_ray.weight_sync.cuda_ipc import CudaIpcSender, local_device_for
from psr_ray.weight_sync.nccl import NcclSender, engine_init_infos, rank_offsets
from psr_ray.weight_sync.probe import ProbeSpec

PROBE = ProbeSpec((1, 2, 3), "/nowhere")


def topo(backend="auto", *, trainer_gpu=True, engines_gpu=True, own=True, colocate=False):
    return resolve_backend(backend, trainer_gpu=trainer_gpu, engines_gpu=engines_gpu, engines_own_gpus=own,
                           colocate=colocate)  # fmt: skip


def test_auto_picks_by_topology():
    assert topo(trainer_gpu=False, engines_gpu=False, own=False) is B.OBJECT_STORE  # CPU
    assert topo(engines_gpu=False, own=False) is B.OBJECT_STORE  # GPU trainer, CPU engines
    assert topo() is B.NCCL  # every worker on a GPU of its own
    assert topo(own=False) is B.OBJECT_STORE  # engines share GPUs among themselves: NCCL refuses
    assert topo(own=False, colocate=True) is B.CUDA_IPC  # one GPU for trainer and engines
    assert topo(colocate=True) is B.CUDA_IPC  # colocated: never NCCL, two ranks would share a GPU


def test_explicit_choices_a_layout_cannot_run_are_refused():
    with pytest.raises(ValueError, match="nccl needs .* own"):
        topo("nccl", own=False)
    with pytest.raises(ValueError, match="nccl needs"):
        topo("nccl", colocate=True)
    with pytest.raises(ValueError, match="nccl needs a GPU trainer"):
        topo("nccl", trainer_gpu=False, engines_gpu=False, own=False)  # no GPU at all
    with pytest.raises(ValueError, match="cuda_ipc needs the engines on the trainer's GPU"):
        topo("cuda_ipc")
    with pytest.raises(ValueError, match="colocate needs a GPU trainer"):
        topo(trainer_gpu=False, colocate=True)
    assert topo("object_store") is B.OBJECT_STORE  # always possible
    assert topo("object_store", colocate=True) is B.OBJECT_STORE


def test_backend_for_configs_and_validation_names_the_field():
    gpu = ["rollout.num_gpus_per_engine=1", "judge.num_gpus_per_engine=1", "trainer.use_gpu=true"]
    assert backend_for(C.PSRConfig()) is B.OBJECT_STORE
    assert backend_for(C.load([], gpu)) is B.NCCL
    shared = ["rollout.num_gpus_per_engine=0.3", "judge.num_gpus_per_engine=0.3", "trainer.use_gpu=true"]
    assert backend_for(C.load([], shared)) is B.OBJECT_STORE
    assert backend_for(C.load([], [*shared, "weight_sync.colocate=true"])) is B.CUDA_IPC
    tp = ["rollout.num_gpus_per_engine=2", "rollout.tensor_parallel_size=2", "judge.num_gpus_per_engine=1",
          "trainer.use_gpu=true"]  # fmt: skip
    assert backend_for(C.load([], tp)) is B.NCCL
    for overrides, field in ((["weight_sync.colocate=true"], "weight_sync.colocate"),
                             ([*shared, "weight_sync.backend=nccl"], "weight_sync.backend=nccl"),
                             (["weight_sync.timeout_s=0"], "weight_sync.timeout_s")):  # fmt: skip
        with pytest.raises(ValueError, match=field):
            preflight.validate(C.load([], overrides), gpu_available=True, check_paths=False)


def vllm_ranks(init_info: dict, tensor_parallel_size: int) -> list[int]:
    """The NCCL rank each worker of one engine claims, computed by vLLM's own worker-side code."""
    from vllm.distributed.weight_transfer import nccl_common
    from vllm.distributed.weight_transfer.nccl_common import NCCLWeightTransferInitInfo

    claimed = []
    original = nccl_common.stateless_init_process_group
    accelerator = nccl_common.torch.accelerator.current_device_index
    nccl_common.stateless_init_process_group = lambda addr, port, rank, world, device: claimed.append((rank, world))
    nccl_common.torch.accelerator.current_device_index = lambda: 0
    try:
        for worker in range(tensor_parallel_size):
            parallel = SimpleNamespace(data_parallel_index=0, world_size=tensor_parallel_size, rank=worker)
            nccl_common.worker_init_process_group(NCCLWeightTransferInitInfo(**init_info), parallel)
    finally:
        nccl_common.stateless_init_process_group = original
        nccl_common.torch.accelerator.current_device_index = accelerator
    assert {world for _, world in claimed} == {init_info["world_size"]}
    return [rank for rank, _ in claimed]


def test_rank_offsets_give_every_worker_its_own_rank():
    assert rank_offsets([1, 1]) == [1, 2]  # rollout + judge, TP 1: vLLM's own trainer_init gives both 1
    assert rank_offsets([2, 4, 1]) == [1, 3, 7]
    with pytest.raises(ValueError):
        rank_offsets([1, 0])
    for num_engines in (1, 2, 3):
        for tps in itertools.product((1, 2, 3, 4), repeat=num_engines):
            infos = engine_init_infos(list(tps), master_address="10.0.0.1", master_port=29500, bucket_bytes=2**20)
            ranks = [r for info, tp in zip(infos, tps, strict=True) for r in vllm_ranks(info, tp)]
            world = 1 + sum(tps)
            assert sorted(ranks) == list(range(1, world)), (tps, ranks)  # rank 0 is the trainer


def test_cuda_ipc_opens_the_senders_gpu_by_uuid_not_index():
    visible = ["GPU-bbb", "GPU-aaa"]  # this worker's CUDA_VISIBLE_DEVICES order
    assert local_device_for("GPU-aaa", visible) == 1
    with pytest.raises(ValueError, match="GPU-ccc, which this engine worker does not see.*colocate"):
        local_device_for("GPU-ccc", visible)
    with pytest.raises(ValueError, match="no GPU"):
        local_device_for("GPU-aaa", [])


def test_make_sender_picks_the_transport_module():
    kwargs = {"probe": PROBE, "restore_dir": None}
    assert make_sender("object_store", ["e"], **kwargs).backend == "object_store"
    assert isinstance(make_sender("cuda_ipc", ["e"], bucket_mb=1, **kwargs), CudaIpcSender)
    assert isinstance(make_sender("nccl", ["e"], **kwargs), NcclSender)
    with pytest.raises(ValueError, match="unknown weight-sync backend"):
        make_sender("pigeon", ["e"], **kwargs)
    for backend in ("object_store", "nccl"):  # non-zero trainer ranks send nothing
        assert make_sender(backend, ["e"], **kwargs).send(None, policy_version=2) is None
    # CUDA IPC feeds each engine from the rank on its GPU: every rank must hold the weights.
    assert CudaIpcSender.every_rank and not NcclSender.every_rank
    with pytest.raises(ValueError, match="whole weights on every trainer rank"):
        make_sender("cuda_ipc", ["e"], **kwargs).send(None, policy_version=2)


def test_sender_for_takes_the_configs_transport_bucket_and_timeout():
    cfg = C.PSRConfig(weight_sync=C.WeightSyncConfig(bucket_mb=3, timeout_s=7.0))
    sender = sender_for(cfg, ["e"], probe=PROBE, restore_dir="/old")
    assert sender.backend == backend_for(cfg) == B.OBJECT_STORE  # a CPU config
    assert (sender.bucket_bytes, sender.timeout_s, sender.restore_dir) == (3 * 2**20, 7.0, "/old")


def test_push_sends_on_every_rank_and_only_the_weights_holder_reaches_the_kill_window(monkeypatch):
    from psr_ray.runtime import kill_windows

    reached, sent = [], []
    monkeypatch.setattr(kill_windows, "reached", reached.append)
    sender = SimpleNamespace(backend="object_store",
                             send=lambda state_dict, *, policy_version: sent.append(policy_version) or "report")  # fmt: skip
    assert push(sender, None, policy_version=3) == "report" and reached == []  # a rank without the weights
    assert push(sender, {"w": None}, policy_version=3) == "report" and reached == ["sync.after_push"]
    assert sent == [3, 3]


def test_every_engine_method_a_sender_calls_exists():
    import inspect
    import re

    from psr_ray.engines.actor import EngineActor
    from psr_ray.pipeline import sync_stage as stage
    from psr_ray.weight_sync import base, cuda_ipc, export, nccl, object_store
    from psr_ray.weight_sync.vllm_extension import WeightSyncExtension

    called = set()
    for module in (base, cuda_ipc, export, nccl, object_store, stage):
        source = inspect.getsource(module)
        called |= set(re.findall(r"call_engines\([^,]+, \"(\w+)\"", source))
        called |= set(re.findall(r"\be\.(\w+)\.remote", source))
    assert {"check_update", "begin_update", "load_bucket", "load_bucket_from_ipc", "load_folder", "end_update",
            "commit_update", "rollback_update", "transfer_init", "transfer_receive", "transfer_world_size",
            "transfer_shutdown", "update_state", "wake_up"} <= called  # fmt: skip
    for method in called:
        assert callable(getattr(EngineActor, method, None)), method
    from psr_ray.weight_sync import receivers

    rpcs = set()  # what the engine's end asks of its workers: the shared transaction and each transport's loads
    for module in (receivers, cuda_ipc, export, nccl, object_store):
        rpcs |= set(re.findall(r"_rpc\(\"(\w+)\"", inspect.getsource(module)))
    assert {"begin_update", "load_bucket", "load_bucket_from_path", "load_bucket_from_ipc", "end_update",
            "abort_update", "refresh_tied_heads"} <= rpcs  # fmt: skip
    for method in rpcs:
        assert callable(getattr(WeightSyncExtension, method, None)), method
