"""GPU placement on logical GPUs (issue 23, defect 2): colocation's fractional shares, the per-rank CUDA IPC
assignment, engines woken weights first, Ray Train's start-up bounded; then every topology a user can
configure, placed by the real engine pools and the real Ray Train worker group on a `ray.cluster_utils.Cluster`
whose nodes declare GPUs (tests/scenarios/placement.py: the engine stops where vllm.LLM would start, the
trainer's loop reports its placement over gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from psr_ray import config as C
from psr_ray.config.topology import colocated_shares, colocation_problems
from psr_ray.pipeline.capacity import placement_errors, run_demands
from psr_ray.trainer.group import scaling_kwargs, start_bound, trainer_gpu_share
from psr_ray.weight_sync.cuda_ipc import engines_by_rank

ROOT = Path(__file__).resolve().parents[1]
COLOCATED = ("trainer.use_gpu=true", "weight_sync.colocate=true", "rollout.num_gpus_per_engine=0.4",
             "judge.num_gpus_per_engine=0.4")  # fmt: skip


def colocated(n: int, *more: str) -> C.PSRConfig:
    return C.load([], [*COLOCATED, f"trainer.num_workers={n}", f"rollout.num_engines={n}", f"judge.num_engines={n}",
                       *more])  # fmt: skip


def test_colocation_splits_each_gpu_between_its_engines_and_one_trainer_worker():
    cfg = colocated(4)
    assert colocated_shares(cfg) == (0.8, 0.2) and trainer_gpu_share(cfg) == 0.2
    worker = scaling_kwargs(cfg.trainer, trainer_gpu_share(cfg))["resources_per_worker"]
    assert worker == {"CPU": 1.0, "GPU": 0.2}
    # One engine of 0.3 leaves 0.7; the trainer takes at most 0.4, so the engines' share stays above half a GPU.
    assert colocated_shares(colocated(2, "judge.num_engines=0", "rollout.num_gpus_per_engine=0.3")) == (0.6, 0.4)
    assert trainer_gpu_share(C.load([], ["trainer.use_gpu=true"])) == 1.0  # not colocated: whole GPUs


def test_colocation_refuses_layouts_it_cannot_place():
    (counts,) = colocation_problems(colocated(2, "rollout.num_engines=3"))
    assert "rollout.num_engines == trainer.num_workers (2)" in counts
    (whole,) = colocation_problems(colocated(1, "judge.num_gpus_per_engine=1"))
    assert "judge engines on a fraction of one GPU" in whole
    (full,) = colocation_problems(colocated(1, "rollout.num_gpus_per_engine=0.6"))
    assert "ask for 1 of it, leaving no share for the trainer worker" in full
    assert colocation_problems(C.load([], [])) == []


def test_capacity_counts_colocated_gpus_as_the_pool_and_trainer_ask_them():
    from psr_ray.engines.pool import colocation_bundles

    cfg = colocated(4)
    demands = {d.what: d.resources for d in run_demands(cfg)}
    assert colocation_bundles(cfg) == [{"GPU": 0.8, "CPU": 2.0}] * 4
    assert demands["colocated engines on GPU 3"] == {"GPU": 0.8, "CPU": 2.0}
    assert demands["trainer worker 3"] == {"GPU": 0.2, "CPU": 1.0} and len(demands) == 8
    assert placement_errors(run_demands(cfg), [{"CPU": 12.0, "GPU": 4.0}]) == []
    assert placement_errors(run_demands(cfg), [{"CPU": 12.0, "GPU": 3.0}])  # one GPU short


def test_the_trainer_groups_start_is_bounded():
    env, failure = start_bound(C.TrainerConfig(start_timeout_s=30, max_failures=1))
    assert env == {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "30"}
    assert failure == {"max_failures": 1, "controller_failure_limit": 1}  # Ray Train's default -1: forever


def test_each_trainer_rank_feeds_the_engines_on_its_gpu():
    node = "n1"
    ranks = [(node, ("0",)), (node, ("1",))]
    engines = [(node, ("1",)), (node, ("0",)), (node, ("0",)), ("n2", ("1",))]
    with pytest.raises(ValueError, match=r"no trainer rank shares a GPU with engine #3 on node n2 GPU 1"):
        engines_by_rank(ranks, engines)
    assert engines_by_rank(ranks, engines[:3]) == [[1, 2], [0]]
    assert engines_by_rank([None], [None, None]) == [[0, 1]]  # one process without Ray's GPUs: every engine


class FakeLLM:
    """vLLM's sleep / wake_up / collective_rpc, recorded."""

    def __init__(self):
        self.calls = []

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tuple(tags or ())))

    def collective_rpc(self, method, args=()):
        self.calls.append(("rpc", method))
        return [len(args[0]) if method == "load_bucket" else None]

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))


class FakeBatcher:
    """engines/batching.py's drain, recorded in the engine's call log."""

    def __init__(self, llm):
        self.llm = llm

    def drain(self):
        self.llm.calls.append(("drain",))


def receiver(tiny_model_dir):
    from psr_ray.engines.settings import EngineSettings
    from psr_ray.weight_sync.receivers import WeightReceiver

    engine = WeightReceiver()
    engine.llm, engine.name, engine._in_process = FakeLLM(), "psr-rollout-0", True
    engine._batcher = FakeBatcher(engine.llm)
    engine.settings = EngineSettings(model_path=tiny_model_dir, role="rollout")
    engine._init_receiver(1)
    return engine


def test_a_colocated_engine_wakes_its_weights_for_the_sync_and_its_kv_cache_once_they_are_in(tiny_model_dir):
    from psr_ray.runtime.models import load_safetensors_dir

    engine = receiver(tiny_model_dir)
    engine.sleep()
    assert engine.update_state() == "asleep"
    engine.update_weights(load_safetensors_dir(tiny_model_dir), policy_version=2)
    calls = [c for c in engine.llm.calls if c[0] != "rpc" or c[1] != "load_bucket"]
    # The requests in the engine finish (drain) before it sleeps and before its weights change.
    assert calls == [("drain",), ("sleep", 1), ("drain",), ("wake_up", ("weights",)), ("rpc", "begin_update"),
                     ("rpc", "end_update"), ("wake_up", ("kv_cache",)), ("reset_prefix_cache",)]  # fmt: skip
    assert engine.update_state() == "serving" and engine.policy_version() == 2


def test_an_engine_whose_sync_never_came_wakes_whole_weights_first(tiny_model_dir):
    engine = receiver(tiny_model_dir)
    engine.sleep()
    engine.wake_up()
    assert engine.llm.calls[2:] == [("wake_up", ("weights",)), ("wake_up", ("kv_cache",))]
    assert engine.update_state() == "serving"


def test_a_refused_plan_leaves_a_sleeping_engine_asleep(tiny_model_dir):
    engine = receiver(tiny_model_dir)
    engine.sleep()
    with pytest.raises(ValueError, match="refused"):
        engine.begin_update([("nope", (1,), "float32")], policy_version=2)
    assert engine.update_state() == "asleep" and engine.llm.calls == [("drain",), ("sleep", 1)]


# ---- every topology, placed by the real pools and Ray Train on logical GPUs ------------------------------


# The topologies this change places differently, and the bound; bench/gpu_placement.py places every topology
# (the recipe's and TP 2's engine paths too) and writes bench/results/gpu_placement.md: ~7 minutes at load 45.
PLACED = ("colocated-1gpu", "colocated-node", "unplaceable")


@pytest.fixture(scope="module")
def placed(tmp_path_factory):
    """The harness in its own process (its own Ray cluster beside the session's): ~2 minutes on 2 busy cores,
    ~4 at load 45."""
    out = tmp_path_factory.mktemp("placement") / "placement.json"
    env = os.environ | {"PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = subprocess.run([sys.executable, "-m", "tests.scenarios.placement", str(out), *PLACED], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    seen = json.loads(out.read_text())
    return {t["topology"]: t for t in seen["topologies"]} | {"unplaceable": seen["unplaceable"]}


def engines(seen, role):
    return [e for e in seen["engines"] if e["role"] == role]


@pytest.mark.ray
@pytest.mark.slow
def test_every_topology_lands_where_it_is_configured(placed):
    from tests.scenarios.placement import problems

    for name in PLACED[:-1]:
        assert problems(placed[name]) == [], name


@pytest.mark.ray
@pytest.mark.slow
def test_colocated_rank_i_and_engine_i_of_each_role_share_gpu_i(placed):
    seen = placed["colocated-node"]
    ranks = sorted(seen["trainer"], key=lambda r: r["rank"])
    rollout, judge = engines(seen, "rollout"), engines(seen, "judge")
    assert [r["gpu_ids"] for r in ranks] == [["0"], ["1"], ["2"], ["3"]]
    for i, rank in enumerate(ranks):
        assert rank["resources"]["GPU"] == 0.2
        assert rollout[i]["host"]["gpu_ids"] == judge[i]["host"]["gpu_ids"] == rank["gpu_ids"]
        assert rollout[i]["host"]["cuda_visible_devices"] == rank["gpu_ids"][0]  # the engine sees only its GPU
        assert rank["gpu_ids"][0] in rank["cuda_visible_devices"].split(",")  # Ray Train widens to the node's
        assert {rollout[i]["host"]["resources"]["GPU"], judge[i]["host"]["resources"]["GPU"]} == {0.4}
    assert seen["fed"] == [[i, 4 + i] for i in range(4)]  # rank i feeds rollout i and judge i
    (rank,) = placed["colocated-1gpu"]["trainer"]
    assert placed["colocated-1gpu"]["fed"] == [[0, 1]] and rank["resources"]["GPU"] == 0.2


@pytest.mark.ray
@pytest.mark.slow
def test_a_trainer_that_cannot_be_placed_fails_naming_it_instead_of_hanging(placed):
    failed = placed["unplaceable"]
    assert failed["error"].startswith("RuntimeError: the trainer group (1 workers of {'GPU': 1.0, 'CPU': 1.0}) "
                                      "could not start: WorkerGroupStartupTimeoutError")  # fmt: skip
    assert "Tried 2 times, 3 s each (trainer.start_timeout_s, trainer.max_failures)" in failed["error"]
    assert failed["seconds"] < 120
