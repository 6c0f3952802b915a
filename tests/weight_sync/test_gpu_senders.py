"""The GPU senders' orchestration around the GPU calls, on a real local Ray with stand-in engine actors (a unit
test: the GPU calls are replaced, everything around them runs). NCCL: each engine joins with its own rank
offset, a failed broadcast is the error reported (not the clean-up's), every engine rolls back, and an engine
stuck in NCCL is killed instead of hanging the sync. CUDA IPC: buckets that never split a layer, all inside one
update per engine."""

from __future__ import annotations

import time

import pytest

from psr_ray.weight_sync import cuda_ipc, nccl
from psr_ray.weight_sync.plan import layer_key
from psr_ray.weight_sync.probe import ProbeSpec, reference_logprobs

pytestmark = pytest.mark.ray


def stand_in_engine_class():
    """Defined in a function so that Ray ships the class by value (workers cannot import test modules)."""

    class StandInEngine:
        """What an engine actor answers in an NCCL sync; `stuck`: its receive never returns (as a worker whose
        trainer stopped broadcasting)."""

        def __init__(self, name: str, workers: int, answer: dict, *, stuck: bool = False):
            self.name, self.workers, self.answer, self.stuck = name, workers, answer, stuck
            self.version, self.pending, self.calls = 1, None, []

        def check_update(self, plan, *, policy_version):
            return self.name

        def node(self):
            return self.name, "stand-in-node"

        def begin_update(self, plan, *, policy_version, restore_dir=None, via="extension"):
            self.calls.append(("begin", via, restore_dir))
            self.pending = policy_version
            return self.name

        def transfer_world_size(self):
            return self.workers

        def transfer_init(self, info):
            self.calls.append(("init", info["rank_offset"], info["world_size"]))

        def transfer_receive(self, update_info):
            self.calls.append(("receive", len(update_info["names"])))
            while self.stuck:
                time.sleep(1)

        def load_bucket_from_ipc(self, shared):
            self.calls.append(("bucket", [name for name, _, _ in shared["metas"]], shared["uuid"]))
            return len(shared["metas"])

        def end_update(self, token_ids, num_top):
            self.calls.append(("end",))
            return self.answer

        def commit_update(self):
            self.version, self.pending = self.pending, None
            return self.version

        def rollback_update(self):
            self.calls.append(("rollback",))
            self.pending = None
            return self.version

        def transfer_shutdown(self):
            self.calls.append(("shutdown",))

        def log(self):
            return self.calls, self.version

    return StandInEngine


@pytest.fixture
def gpu_calls(monkeypatch):
    """The three GPU calls, recorded; `failures` makes the broadcast or the clean-up raise."""
    seen, failures = [], {}

    def open_group(address, port, world_size):
        seen.append(("open", world_size))
        return "group"

    def broadcast(group, state_dict, *, bucket_bytes):
        seen.append(("broadcast", len(state_dict)))
        if "broadcast" in failures:
            raise failures["broadcast"]

    def close_group(group):
        seen.append(("close",))
        if "close" in failures:
            raise failures["close"]

    monkeypatch.setattr(nccl, "_open_group", open_group)
    monkeypatch.setattr(nccl, "_broadcast", broadcast)
    monkeypatch.setattr(nccl, "_close_group", close_group)
    return seen, failures


@pytest.fixture(scope="module")
def weights(tiny_model_dir):
    from psr_ray.runtime.models import load_safetensors_dir

    state = load_safetensors_dir(tiny_model_dir)
    probe = ProbeSpec((5, 17, 40, 3), tiny_model_dir, num_top=4)
    ref = reference_logprobs(state, probe)
    top = sorted(range(len(ref["next"])), key=lambda i: -ref["next"][i])[:4]
    return state, probe, {"prompt": ref["prompt"], "top": {i: ref["next"][i] for i in top}}


def start(ray, answer, workers, *, stuck=()):
    cls = ray.remote(stand_in_engine_class()).options(num_cpus=0, max_concurrency=1)
    return [cls.remote(f"engine-{i}", w, answer, stuck=i in stuck) for i, w in enumerate(workers)]


def test_each_engine_joins_at_its_own_rank_offset(ray_cluster, gpu_calls, weights):
    state, probe, answer = weights
    engines = start(ray_cluster, answer, [2, 1, 4])
    report = nccl.NcclSender(engines, probe=probe, restore_dir="/old", timeout_s=30).send(state, policy_version=2)
    assert report.ok, report.error
    assert report.backend == "nccl" and report.num_engines == 3 and set(report.probe_errors.values()) == {0.0}
    seen, _ = gpu_calls
    assert seen == [("open", 8), ("broadcast", len(state)), ("close",)]
    logs = ray_cluster.get([e.log.remote() for e in engines])
    assert [calls[1] for calls, _ in logs] == [("init", 1, 8), ("init", 3, 8), ("init", 4, 8)]
    for calls, version in logs:
        assert calls[0] == ("begin", "nccl", "/old") and ("receive", len(state)) in calls and version == 2


def test_a_failed_broadcast_is_the_reported_error_and_every_engine_rolls_back(ray_cluster, gpu_calls, weights):
    state, probe, answer = weights
    seen, failures = gpu_calls
    failures["broadcast"] = RuntimeError("NCCL error: unhandled system error")
    failures["close"] = RuntimeError("Cannot release a trainer connection during a weight update")
    engines = start(ray_cluster, answer, [1, 1])
    report = nccl.NcclSender(engines, probe=probe, restore_dir="/old", timeout_s=30).send(state, policy_version=2)
    assert not report.ok
    assert "NCCL error: unhandled system error" in report.error
    assert "Cannot release" not in report.error
    assert "every engine rolled back" in report.error
    for calls, version in ray_cluster.get([e.log.remote() for e in engines]):
        assert ("rollback",) in calls and version == 1


def test_an_engine_stuck_in_nccl_is_killed_not_waited_for(ray_cluster, gpu_calls, weights):
    state, probe, answer = weights
    _, failures = gpu_calls
    failures["broadcast"] = RuntimeError("NCCL timeout")
    engines = start(ray_cluster, answer, [1, 1], stuck={1})
    started = time.perf_counter()
    report = nccl.NcclSender(engines, probe=probe, restore_dir="/old", timeout_s=3).send(state, policy_version=2)
    assert time.perf_counter() - started < 30
    assert "NCCL timeout" in report.error and "engines #[1] were stuck" in report.error
    calls, version = ray_cluster.get(engines[0].log.remote())
    assert ("rollback",) in calls and version == 1
    with pytest.raises(ray_cluster.exceptions.RayActorError):
        ray_cluster.get(engines[1].log.remote(), timeout=30)


def test_cuda_ipc_sends_whole_layers_in_buckets_of_one_update(ray_cluster, monkeypatch, weights):
    state, probe, answer = weights
    monkeypatch.setattr(cuda_ipc, "_to_gpu", lambda tensors: tensors)
    monkeypatch.setattr(cuda_ipc, "_collect", lambda: None)
    monkeypatch.setattr(
        cuda_ipc,
        "share_bucket",
        lambda tensors: {
            "uuid": "GPU-0",
            "metas": [(n, tuple(t.shape), "float32") for n, t in tensors.items()],
            "handles": {},
        },
    )
    engines = start(ray_cluster, answer, [1, 1])
    sender = cuda_ipc.CudaIpcSender(engines, probe=probe, restore_dir="/old", bucket_mb=1, timeout_s=30)
    report = sender.send(state, policy_version=2)
    assert report.ok, report.error
    for calls, version in ray_cluster.get([e.log.remote() for e in engines]):
        assert version == 2
        assert [c[0] for c in calls] == ["begin"] + ["bucket"] * (len(calls) - 2) + ["end"]
        buckets = [c[1] for c in calls if c[0] == "bucket"]
        assert len(buckets) >= 3 and [n for b in buckets for n in b] == list(state)
        keys = [{layer_key(n) for n in b} for b in buckets]
        assert all(not (a & b) for i, a in enumerate(keys) for b in keys[i + 1 :])  # no layer in two buckets
