"""Per-rank CUDA IPC (issue 23, defect 2): two trainer ranks in a real gloo group, each holding the whole
weights, feed the engines on their own GPU; one transaction spans both: a wrong engine behind rank 1 rolls
back the engines of rank 0 too. Only the GPU calls are replaced (the bucket's move to the GPU, its IPC
handles, and Ray's GPU ids, given per rank); engines are stand-in actors."""

from __future__ import annotations

import socket

import pytest

from psr_ray.weight_sync.probe import ProbeSpec, reference_logprobs

pytestmark = pytest.mark.ray
NODE = "node-a"


def classes():
    """Defined in a function so that Ray ships them by value (workers cannot import test modules)."""

    class Engine:
        def __init__(self, name, gpu, answer):
            self.name, self.gpu, self.answer = name, gpu, answer
            self.version, self.pending, self.calls = 1, None, []

        def gpu_placement(self):
            return (NODE, (self.gpu,))

        def node(self):
            return self.name, "stand-in-node"

        def check_update(self, plan, *, policy_version):
            return self.name

        def begin_update(self, plan, *, policy_version, restore_dir=None, via="extension"):
            self.calls.append(("begin",))
            self.pending = policy_version
            return self.name

        def load_bucket_from_ipc(self, shared):
            self.calls.append(("bucket", shared["uuid"]))
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

        def log(self):
            return self.calls, self.version

    class Rank:
        """One trainer rank: its gloo group, its GPU (as Ray would report it) and the CUDA IPC sender."""

        def __init__(self, rank, port, gpu):
            import torch.distributed as dist

            from psr_ray.weight_sync import cuda_ipc

            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
            cuda_ipc.gpu_key = lambda: (NODE, (gpu,))
            cuda_ipc._to_gpu = lambda tensors: tensors
            cuda_ipc._collect = lambda: None
            cuda_ipc.share_bucket = lambda tensors: {
                "uuid": f"GPU-{gpu}", "metas": [(n, tuple(t.shape), "float32") for n, t in tensors.items()],
                "handles": {}}  # fmt: skip

        def send(self, engines, model_dir, probe):
            from psr_ray.runtime.models import load_safetensors_dir
            from psr_ray.weight_sync.cuda_ipc import CudaIpcSender

            sender = CudaIpcSender(engines, probe=probe, restore_dir="/old", bucket_mb=1, timeout_s=60)
            report = sender.send(load_safetensors_dir(model_dir), policy_version=2)
            return None if report is None else report.to_dict()

    return Engine, Rank


@pytest.fixture(scope="module")
def answer(tiny_model_dir):
    from psr_ray.runtime.models import load_safetensors_dir

    probe = ProbeSpec((5, 17, 40, 3), tiny_model_dir, num_top=4)
    ref = reference_logprobs(load_safetensors_dir(tiny_model_dir), probe)
    top = sorted(range(len(ref["next"])), key=lambda i: -ref["next"][i])[:4]
    return probe, {"prompt": ref["prompt"], "top": {i: ref["next"][i] for i in top}}


def sync(ray, tiny_model_dir, probe, answers):
    Engine, Rank = (ray.remote(c).options(num_cpus=0) for c in classes())
    engines = [Engine.remote(f"engine-{i}", str(i % 2), a) for i, a in enumerate(answers)]  # GPUs 0, 1, 0, 1
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ranks = [Rank.remote(r, port, str(r)) for r in range(2)]
    reports = ray.get([r.send.remote(engines, tiny_model_dir, probe) for r in ranks], timeout=300)
    logs = ray.get([e.log.remote() for e in engines])
    for actor in ranks:
        ray.kill(actor)
    return reports, logs


def test_each_rank_feeds_the_engines_on_its_gpu_in_one_transaction(ray_cluster, tiny_model_dir, answer):
    probe, good = answer
    (report, other), logs = sync(ray_cluster, tiny_model_dir, probe, [good] * 4)
    assert other is None and report["error"] is None, report["error"]
    assert report["num_engines"] == 4 and sorted(report["probe_errors"]) == [f"engine-{i}" for i in range(4)]
    for i, (calls, version) in enumerate(logs):
        assert version == 2 and calls[0] == ("begin",) and calls[-1] == ("end",)
        assert {c[1] for c in calls if c[0] == "bucket"} == {f"GPU-{i % 2}"}  # only its own rank's GPU


def test_a_wrong_engine_behind_one_rank_rolls_back_every_engine(ray_cluster, tiny_model_dir, answer):
    probe, good = answer
    wrong = {"prompt": [p - 1.0 for p in good["prompt"]], "top": good["top"]}
    (report, _), logs = sync(ray_cluster, tiny_model_dir, probe, [good, good, good, wrong])
    assert "engine engine-3 does not serve the trainer's weights" in report["error"]
    assert "Every engine rolled back" in report["error"] and report["probe_errors"]["engine-3"] > 0.9
    assert all(version == 1 and ("rollback",) in calls for calls, version in logs)
