"""Whether the cluster can place a run, checked before any engine starts (issue 26 §3). Pure: the nodes are
given as Ray reports them (`ray.nodes()[i]["Resources"]`)."""

from __future__ import annotations

import dataclasses

import pytest

from psr_ray.config import DEFAULT_CONFIG, REPO_ROOT, load
from psr_ray.pipeline.capacity import Demand, check_capacity, describe, placement_errors, run_demands

RECIPE = REPO_ROOT / "jobs" / "configs" / "qwen2.5-math-7b.yaml"
HEAD = {"CPU": 0.0, "memory": 3e10, "node:__internal_head__": 1.0}


def gpu_node(resource: str, gpus: int = 8) -> dict[str, float]:
    return {"CPU": 96.0, "GPU": float(gpus), resource: float(gpus), "memory": 1e12, "node:10.0.0.2": 1.0}


def test_the_recipe_asks_for_its_engines_and_trainer_workers():
    demands = run_demands(load([str(RECIPE)], []))
    engines = [d for d in demands if "engine" in d.what]
    workers = [d for d in demands if "trainer" in d.what]
    assert len(engines) == 6 and len(workers) == 8
    assert engines[0].resources == {"CPU": 8.0, "GPU": 1.0, "psr_engine": 1.0}
    assert workers[0].resources == {"CPU": 8.0, "GPU": 1.0, "psr_trainer": 1.0}


def test_the_recipe_fits_its_engine_and_trainer_nodes():
    cfg = load([str(RECIPE)], [])
    assert placement_errors(run_demands(cfg), [HEAD, gpu_node("psr_engine"), gpu_node("psr_trainer")]) == []


def test_a_cluster_without_the_engine_node_group_is_refused_naming_what_it_lacks():
    cfg = load([str(RECIPE)], ["run.autoscaling=false"])
    nodes = [HEAD, gpu_node("psr_trainer")]
    with pytest.raises(ValueError) as err:
        check_capacity(cfg, nodes)
    text = str(err.value)
    assert "\n" not in text
    assert "the run asks for 6 psr_engine in all, the cluster has 0" in text
    assert "no node can hold rollout engine 0 (CPU: 8, GPU: 1, psr_engine: 1)" in text
    assert "2 nodes: 96 CPU, 8 GPU, 8 psr_trainer" in text


def test_demands_that_fit_alone_but_not_together_are_named():
    nodes = [{"CPU": 4.0, "GPU": 1.0}, {"CPU": 4.0, "GPU": 1.0}]
    demands = [Demand("a", {"GPU": 1.0}), Demand("b", {"GPU": 1.0}), Demand("c", {"GPU": 0.5, "CPU": 1.0})]
    assert placement_errors(demands, nodes) == ["the run asks for 2.5 GPU in all, the cluster has 2"]
    # Fractional shares pack: two 0.4 engines and a 0.2 worker share one GPU.
    shared = [Demand("e0", {"GPU": 0.4}), Demand("e1", {"GPU": 0.4}), Demand("w", {"GPU": 0.2})]
    assert placement_errors(shared, [{"CPU": 2.0, "GPU": 1.0}]) == []


def test_with_an_autoscaler_a_shortfall_is_a_warning_not_an_error(monkeypatch):
    import ray.autoscaler.sdk as sdk

    asked: list = []
    monkeypatch.setattr(sdk, "request_resources", lambda bundles: asked.append(bundles))
    cfg = load([str(RECIPE)], [])  # the recipe sets run.autoscaling: true
    assert cfg.run.autoscaling
    (warning,) = check_capacity(cfg, [HEAD])
    assert "asked its autoscaler for the nodes (run.autoscaling)" in warning
    assert len(asked[0]) == 14  # every engine and trainer worker bundle


def test_the_embedded_preset_fits_the_local_ray_of_this_machine():
    cfg = load([str(DEFAULT_CONFIG)], [])
    local = {"CPU": 4.0, "memory": 1.6e10, "object_store_memory": 7e9, "node:__internal_head__": 1.0}
    assert check_capacity(cfg, [local]) == []
    bigger = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, num_workers=8, num_cpus_per_worker=1))
    with pytest.raises(ValueError, match="the run asks for 10 CPU in all, the cluster has 4"):
        check_capacity(bigger, [local])
    assert describe([local]) == "1 node: 4 CPU"


def test_a_command_asks_only_for_what_it_starts():
    cfg = load([str(RECIPE)], [])
    assert all("trainer" in d.what for d in run_demands(cfg, engines=False))
    assert all("engine" in d.what for d in run_demands(cfg, trainer=False))
    # eval on a cluster of engine nodes only: placeable; the whole run is not.
    nodes = [HEAD, gpu_node("psr_engine")]
    assert placement_errors(run_demands(cfg, trainer=False), nodes) == []
    assert placement_errors(run_demands(cfg), nodes) != []


def test_engine_counts_set_by_scale_replace_the_configured_ones():
    # The recipe with separate pools, 4 rollout + 2 judge engines on 8 psr_engine GPUs (its default is one pool).
    cfg = load([str(RECIPE)], ["run.autoscaling=false", "rollout.num_engines=4", "judge.num_engines=2",
                               "judge.num_gpus_per_engine=1", "judge.node_resource=psr_engine"])  # fmt: skip
    nodes = [HEAD, gpu_node("psr_engine"), gpu_node("psr_trainer")]
    scaled = run_demands(cfg, counts={"rollout": 7})
    assert sum("rollout engine" in d.what for d in scaled) == 7 and sum("judge" in d.what for d in scaled) == 2
    assert placement_errors(run_demands(cfg, counts={"rollout": 6}), nodes) == []  # 6 + 2 = the node's 8
    with pytest.raises(ValueError, match="the run asks for 9 psr_engine in all, the cluster has 8"):
        check_capacity(cfg, nodes, counts={"rollout": 7})  # a resumed run at what scale.json says


@pytest.mark.ray
def test_an_unplaceable_run_fails_against_the_real_clusters_nodes_before_any_engine(ray_cluster):
    ray = ray_cluster
    cfg = load([str(DEFAULT_CONFIG)], ["rollout.node_resource=psr_engine", "run.autoscaling=false"])
    before = set(ray.util.list_named_actors())
    with pytest.raises(ValueError, match=r"the run asks for 1 psr_engine in all, the cluster has 0; no node can hold "
                       r"rollout engine 0 \(CPU: 2, psr_engine: 1\)"):  # fmt: skip
        check_capacity(cfg)  # the nodes as ray.nodes() reports them
    assert set(ray.util.list_named_actors()) == before
    assert check_capacity(load([str(DEFAULT_CONFIG)], [])) == []


# ---- the run's folders on every node (pipeline/node_paths.py) ---------------------------------------------


def test_a_node_without_the_drivers_folder_is_named(tmp_path):
    from psr_ray.pipeline.node_paths import node_path_errors, seen_on_node

    shared, other = tmp_path / "shared", tmp_path / "local"
    shared.mkdir()
    other.mkdir()
    (shared / "probe").write_text("token")
    (other / "probe").write_text("another run's token")
    assert seen_on_node({"run.output_dir": str(shared)}, "probe", "token") == {"run.output_dir": ""}
    on_local = seen_on_node({"run.output_dir": str(other), "run.cache_dir": str(tmp_path)}, "probe", "token")
    assert on_local == {"run.output_dir": "another file of the probe's name",
                        "run.cache_dir": "a different folder of that name"}  # fmt: skip
    reports = {"10.0.0.1 aaaa": {"run.output_dir": ""}, "10.0.0.2 bbbb": {"run.output_dir": "no such folder"}}
    assert node_path_errors(reports, {"run.output_dir": "/mnt/run"}) == [
        "run.output_dir /mnt/run is not the driver's folder on node(s) 10.0.0.2 bbbb (no such folder)"
    ]


def test_shared_folders_are_the_existing_ones_a_node_opens(tmp_path):
    from psr_ray.pipeline.node_paths import shared_folders

    model = tmp_path / "model"
    model.mkdir()
    cfg = load([str(DEFAULT_CONFIG)], [f"model.path={model}", f"run.cache_dir={tmp_path / 'none'}"])
    assert shared_folders(cfg, tmp_path) == {"run.output_dir": str(tmp_path), "model.path": str(model)}
    hub = load([str(DEFAULT_CONFIG)], ["model.path=Qwen/Qwen2.5-Math-7B", f"run.cache_dir={tmp_path}"])
    assert shared_folders(hub, None) == {"run.cache_dir": str(tmp_path)}


_TWO_NODES = """
import json, sys
from pathlib import Path
import ray
from ray.cluster_utils import Cluster
from psr_ray.config import DEFAULT_CONFIG, load
from psr_ray.pipeline import node_paths

out = Path(sys.argv[1])
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
try:
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address)
    cluster.wait_for_nodes()
    (out / "probe").write_text("token")
    reports, late = node_paths.node_reports({"run.output_dir": str(out)}, "probe", "token")
    cfg = load([str(DEFAULT_CONFIG)], [f"run.cache_dir={out / 'cache'}"])
    warnings = node_paths.check_node_paths(cfg, out)
    print(json.dumps({"reports": reports, "late": late, "warnings": warnings}))
finally:
    ray.shutdown()
    cluster.shutdown()
"""


@pytest.mark.ray
def test_every_node_of_a_cluster_reads_the_drivers_probe_and_none_is_left(tmp_path):
    """On a simulated two-node cluster (a 0-CPU head and a worker node, one filesystem) a task on each node
    reads the driver's probe; the start-up check passes, makes the cache folder and leaves no probe behind.
    (Its own process: a test session's Ray cannot be re-pointed at another cluster.)"""
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _TWO_NODES, str(tmp_path)], capture_output=True, text=True,
                          timeout=300, cwd=REPO_ROOT)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(result["reports"]) == 2 and result["late"] == [] and result["warnings"] == []
    assert all(report == {"run.output_dir": ""} for report in result["reports"].values())
    assert (tmp_path / "cache").is_dir()
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".psr-ray-node-probe")]


def test_why_unplaceable_names_the_resource_no_live_node_provides(monkeypatch):
    import ray

    from psr_ray.runtime.cluster import why_unplaceable

    nodes = [{"Alive": True, "Resources": {"CPU": 4.0, "psr_trainer": 2.0}},
             {"Alive": False, "Resources": {"CPU": 2.0, "psr_engine": 2.0}}]  # fmt: skip  # the lost engine node
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    assert why_unplaceable({"CPU": 0.5, "psr_engine": 1.0}) == (
        "no live node of the cluster provides psr_engine (each asks for CPU: 0.5, psr_engine: 1)"
    )
    assert why_unplaceable({"CPU": 8.0}) == "no live node of the cluster provides CPU (each asks for CPU: 8)"
    assert why_unplaceable({"CPU": 1.0, "psr_trainer": 1.0}) is None  # a node has them: something else is wrong
    nodes[1]["Alive"] = True  # each resource somewhere, not all on one node
    assert why_unplaceable({"psr_engine": 1.0, "psr_trainer": 1.0}) == (
        "no live node of the cluster has psr_engine: 1, psr_trainer: 1 in total"
    )
