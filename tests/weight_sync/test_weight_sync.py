"""Weight-sync pieces that run without GPUs. The object-store transport into real engines is exercised by
tests/test_loop.py (engines match a fresh load of the export); CUDA IPC and NCCL need GPUs (not run here)."""

from __future__ import annotations

import inspect
import re

import pytest
import torch

from psr_ray import config as C
from psr_ray.config import WeightSyncBackend
from psr_ray.weight_sync import backend_for, base, cuda_ipc, make_sender, nccl, resolve_backend

TRANSPORTS = [b for b in WeightSyncBackend if b is not WeightSyncBackend.AUTO]


def test_resolve_backend():
    assert resolve_backend("auto", trainer_gpu=False, engines_gpu=False, colocated=False) == "object_store"
    assert resolve_backend("auto", trainer_gpu=True, engines_gpu=True, colocated=True) == "cuda_ipc"
    assert resolve_backend("auto", trainer_gpu=True, engines_gpu=True, colocated=False) == "nccl"
    assert resolve_backend("auto", trainer_gpu=True, engines_gpu=False, colocated=False) == "object_store"
    assert resolve_backend("object_store", trainer_gpu=True, engines_gpu=True, colocated=False) == "object_store"
    with pytest.raises(ValueError, match="needs GPU"):
        resolve_backend("nccl", trainer_gpu=False, engines_gpu=False, colocated=False)


def test_backend_for_configs():
    assert backend_for(C.PSRConfig()) == "object_store"
    gpu = C.load([], ["rollout.num_gpus_per_engine=1", "judge.num_gpus_per_engine=1", "trainer.use_gpu=true"])
    assert backend_for(gpu) == "nccl"


def test_make_sender_picks_the_transport_module():
    assert make_sender("object_store", ["e"]).backend == "object_store"
    assert isinstance(make_sender("cuda_ipc", ["e"], bucket_mb=1), cuda_ipc.CudaIpcSender)
    assert isinstance(make_sender("nccl", ["e"]), nccl.NcclSender)
    with pytest.raises(ValueError, match="unknown weight-sync backend"):
        make_sender("pigeon", ["e"])


def test_non_zero_ranks_send_nothing():
    for backend in TRANSPORTS:
        assert make_sender(backend, ["e"]).send(None, policy_version=2) is None


def test_buckets_keep_order_and_size():
    state = {f"w{i}": torch.zeros(n) for i, n in enumerate([10, 10, 30, 5, 5])}  # 40, 40, 120, 20, 20 bytes
    assert cuda_ipc.buckets(state, 80) == [["w0", "w1"], ["w2"], ["w3", "w4"]]
    assert cuda_ipc.buckets(state, 10**6) == [list(state)]
    assert base.state_dict_bytes(state) == 240


def test_every_engine_method_the_gpu_senders_call_exists():
    from psr_ray.engines.actor import EngineActor
    from psr_ray.weight_sync.vllm_extension import WeightSyncExtension

    called = set()
    for module in (cuda_ipc, nccl):
        called |= set(re.findall(r"_all\(\"(\w+)\"", inspect.getsource(module)))
        called |= set(re.findall(r"\be\.(\w+)\.remote", inspect.getsource(module)))
    assert {"update_weights_from_ipc", "transfer_init", "transfer_receive", "transfer_world_size"} <= called
    for method in called:
        assert callable(getattr(EngineActor, method, None)), method
    assert callable(WeightSyncExtension.load_hf_weights_from_ipc)
