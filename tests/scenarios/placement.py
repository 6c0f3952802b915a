"""Where a run's engines and trainer workers land on GPUs, observed on logical GPUs (issue 23): Ray places
by logical resources, so a `ray.cluster_utils.Cluster` whose nodes declare GPUs (and the recipe's node-group
resources) runs the product's real placement on a CPU machine.

For each topology a user can configure (`TOPOLOGIES`) `observe` starts the nodes, the real engine pools
(`engines.pool.start_engine_pool`: its actor options, placement groups and names) and the real Ray Train
worker group (`trainer.group.scaling_kwargs` / `trainer_gpu_share` / `start_bound`, the ScalingConfig
`_fit` uses), and records what Ray assigned to each process: its node, GPU ids, resources, and
CUDA_VISIBLE_DEVICES. Stubbed, only where CUDA starts: `PlacedEngine` is `EngineActor` whose constructor
stops where `vllm.LLM` would claim the GPU (with tensor parallelism it starts one stand-in per shard the way
vLLM's Ray executor starts its workers: a `num_gpus=1` actor per GPU bundle of the engine's placement group);
the trainer's loop reports placement instead of training, over gloo (NCCL needs a GPU). `unplaceable` runs the
real `train_sft` on a trainer that cannot be placed: it must fail, naming the group, within the start bound.

    python -m tests.scenarios.placement OUT.json     # every topology (bench/gpu_placement.py writes the table)
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from psr_ray.engines.actor import EngineActor
from psr_ray.engines.settings import engine_env

RECIPE = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "qwen2.5-math-7b.yaml"
# The recipe's judge runs on its rollout engines (one pool); these give it a pool of its own GPU engines.
_JUDGE_POOL = ("judge.num_gpus_per_engine=1", "judge.node_resource=psr_engine")
_SMALL = ("rollout.num_cpus_per_engine=1", "judge.num_cpus_per_engine=1", "trainer.num_cpus_per_worker=1")
_GPU_TRAINER = ("trainer.use_gpu=true",)


@dataclass(frozen=True)
class Topology:
    name: str
    about: str
    nodes: tuple[tuple[str, dict[str, Any]], ...]  # (label, Cluster.add_node kwargs)
    overrides: tuple[str, ...]  # on the 7B recipe when `recipe`, else on the defaults
    recipe: bool = False


TOPOLOGIES = (
    Topology(
        "recipe",
        "the 7B recipe's node groups (6 engines, 8 trainer GPUs) with separate pools, scaled to 2 rollout + "
        "1 judge engines and 2 trainer workers",
        (
            ("engine node", {"num_cpus": 4, "num_gpus": 3, "resources": {"psr_engine": 3}}),
            ("trainer node", {"num_cpus": 4, "num_gpus": 2, "resources": {"psr_trainer": 2}}),
        ),
        ("rollout.num_engines=2", "judge.num_engines=1", *_JUDGE_POOL, "trainer.num_workers=2", *_SMALL),
        recipe=True,
    ),
    Topology(
        "colocated-1gpu",
        "weight_sync.colocate on one GPU: a rollout and a judge engine (0.4 each) and the trainer",
        (("gpu node", {"num_cpus": 4, "num_gpus": 1}),),
        (
            *_GPU_TRAINER,
            "weight_sync.colocate=true",
            "trainer.num_workers=1",
            "rollout.num_engines=1",
            "judge.num_engines=1",
            "rollout.num_gpus_per_engine=0.4",
            "judge.num_gpus_per_engine=0.4",
            *_SMALL,
        ),
    ),
    Topology(
        "colocated-node",
        "weight_sync.colocate on one 8-GPU node, scaled to 4 GPUs: rollout and judge engine i "
        "and trainer rank i on GPU i",
        (("gpu node", {"num_cpus": 16, "num_gpus": 4}),),
        (
            *_GPU_TRAINER,
            "weight_sync.colocate=true",
            "trainer.num_workers=4",
            "rollout.num_engines=4",
            "judge.num_engines=4",
            "rollout.num_gpus_per_engine=0.4",
            "judge.num_gpus_per_engine=0.4",
            *_SMALL,
        ),
    ),
    Topology(
        "tp2",
        "tensor-parallel 2 engines on the recipe's node groups: a rollout and a judge engine of 2 GPUs "
        "each, 2 trainer workers",
        (
            ("engine node", {"num_cpus": 4, "num_gpus": 4, "resources": {"psr_engine": 4}}),
            ("trainer node", {"num_cpus": 4, "num_gpus": 2, "resources": {"psr_trainer": 2}}),
        ),
        (
            "rollout.num_engines=1",
            "judge.num_engines=1",
            "rollout.tensor_parallel_size=2",
            "judge.tensor_parallel_size=2",
            "rollout.num_gpus_per_engine=2",
            "judge.num_gpus_per_engine=2",
            "judge.node_resource=psr_engine",
            "trainer.num_workers=2",
            *_SMALL,
        ),
        recipe=True,
    ),
)


def where() -> dict[str, Any]:
    """What Ray gave the calling process."""
    import ray

    from psr_ray.weight_sync.cuda_ipc import gpu_key

    context = ray.get_runtime_context()
    return {"node_id": context.get_node_id(), "gpu_ids": [str(i) for i in context.get_accelerator_ids()["GPU"]],
            "resources": {k: round(v, 4) for k, v in context.get_assigned_resources().items()},
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "gpu_key": gpu_key()}  # fmt: skip


class _Shard:
    def where(self) -> dict[str, Any]:
        return where()


class PlacedEngine(EngineActor):
    """`EngineActor` up to the device: its constructor stops where `vllm.LLM` would start on the GPU."""

    def __init__(self, settings: Any, *, name: str, policy_version: int = 0):
        import ray

        os.environ.update(engine_env(settings))
        self.settings, self.name = settings, name
        self._in_process = settings.tensor_parallel_size == 1
        self._shards: list[Any] = []
        if not self._in_process:  # vLLM's Ray executor: a num_gpus=1 worker per GPU bundle of the captured group
            group = ray.util.get_current_placement_group()
            assert group is not None, "a tensor-parallel engine runs in its placement group (engines/pool.py)"
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            gpu_bundles = [i for i, b in enumerate(group.bundle_specs) if b.get("GPU", 0)]
            shard: Any = ray.remote(_Shard)
            self._shards = [shard.options(num_cpus=0, num_gpus=1, scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=group, placement_group_capture_child_tasks=True, placement_group_bundle_index=i)).remote()
                for i in gpu_bundles[: settings.tensor_parallel_size]]  # fmt: skip

    def ready(self) -> dict[str, Any]:
        import ray

        shards = ray.get([s.where.remote() for s in self._shards])
        return {"name": self.name, "model": self.settings.model_path, "host": where(), "shards": shards}


def _report_placement(config: dict[str, Any]) -> None:
    """The trainer's loop, stubbed: every rank's placement and the engines it would feed (cuda_ipc's rule)."""
    import ray.train
    import torch.distributed as dist

    from psr_ray.weight_sync.cuda_ipc import engines_by_rank

    mine = where() | {"rank": ray.train.get_context().get_world_rank()}
    ranks: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, mine)
    fed: Any = None
    if config["engine_keys"] is not None:
        try:
            fed = engines_by_rank(
                [tuple_key(r["gpu_key"]) for r in ranks], [tuple_key(k) for k in config["engine_keys"]]
            )
        except ValueError as err:
            fed = str(err)
    if mine["rank"] == 0:  # this machine's file system (Ray Train keeps no metrics without a checkpoint)
        Path(config["out"]).write_text(json.dumps({"ranks": ranks, "fed": fed}))


def tuple_key(key: Any) -> Any:
    return None if key is None else (key[0], tuple(key[1]))


def load_config(topology: Topology, *more: str) -> Any:
    from psr_ray import config as C

    return C.load([str(RECIPE)] if topology.recipe else [], [*topology.overrides, *more])


class LogicalCluster:
    """One `ray.cluster_utils.Cluster` (a head without CPUs, as on a real cluster) whose GPU nodes change per
    topology: starting a head costs ~20 s on two busy cores, a node a few."""

    def __enter__(self) -> LogicalCluster:
        import ray
        from ray.cluster_utils import Cluster

        # A private temp dir: Cluster writes its address where a plain ray.init() looks for a cluster to join,
        # and other Ray users on this machine must never find this one.
        os.environ["RAY_TMPDIR"] = self._temp = tempfile.mkdtemp(prefix="psrpl_", dir="/tmp")
        self.cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
        ray.init(address=self.cluster.address)
        self._nodes: list[Any] = []
        return self

    def __exit__(self, *exc: Any) -> None:
        import ray

        ray.shutdown()
        self.cluster.shutdown()  # also forgets its address (ray_current_cluster)
        shutil.rmtree(self._temp, ignore_errors=True)

    def use(self, topology: Topology) -> dict[str, str]:
        """Only `topology`'s nodes, nothing of the last one left: {node id: its label}."""
        import ray
        from ray.util.placement_group import PlacementGroup, remove_placement_group

        alive = [a["Name"] for a in ray._private.state.actors().values() if a["State"] == "ALIVE"]
        for name in [n for n in alive if n.startswith("psr-")]:  # the engines (Ray Train's own end with the fit)
            ray.kill(ray.get_actor(name))
        for group_id, group in ray.util.placement_group_table().items():
            if group["state"] != "REMOVED":
                remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group_id))))
        gone = {node.node_id for node in self._nodes}
        for node in self._nodes:
            self.cluster.remove_node(node)
        while any(n["Alive"] and n["NodeID"] in gone for n in ray.nodes()):  # else Ray still places onto them
            time.sleep(0.2)
        self._nodes = [self.cluster.add_node(**kwargs) for _, kwargs in topology.nodes]
        self.cluster.wait_for_nodes()
        return {node.node_id: label for node, (label, _) in zip(self._nodes, topology.nodes, strict=True)}


def observe(cluster: LogicalCluster, topology: Topology) -> dict[str, Any]:
    """Starts `topology` on the cluster; what every engine, shard and trainer rank got."""
    print(f"psr_ray placement: {topology.name}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    observed = _place(topology, cluster.use(topology))
    observed["seconds"] = round(time.perf_counter() - started, 1)
    return observed


def _place(topology: Topology, labels: dict[str, str]) -> dict[str, Any]:
    import ray

    import psr_ray.engines.actor as actor_module
    from psr_ray.engines.pool import start_engine_pool

    cfg = load_config(topology)
    actor_module.EngineActor = PlacedEngine  # type: ignore[misc]  # the pool builds this class (the stub)
    pools = {role: start_engine_pool(cfg, role, "stand-in-model") for role in ("rollout", "judge")}
    engines = []
    for role, pool in pools.items():
        for name, actor in zip(pool.names, pool.actors, strict=True):
            info = ray.get(actor.ready.remote())
            engines.append({"role": role, "name": name, "asked": _asked(getattr(cfg, role)), **info,
                            "gpu_placement": ray.get(actor.gpu_placement.remote())})  # fmt: skip
    keys = [e["gpu_placement"] for e in engines] if cfg.weight_sync.colocate else None
    ranks, fed = _train_placement(cfg, keys)
    return {"topology": topology.name, "about": topology.about, "nodes": labels, "engines": engines,
            "trainer": ranks, "fed": fed, "colocate": cfg.weight_sync.colocate,
            "trainer_share": _trainer_share(cfg)}  # fmt: skip


def _asked(section: Any) -> dict[str, Any]:
    return {"num_gpus_per_engine": section.num_gpus_per_engine, "tensor_parallel_size": section.tensor_parallel_size,
            "node_resource": section.node_resource}  # fmt: skip


def _trainer_share(cfg: Any) -> float:
    from psr_ray.trainer.group import trainer_gpu_share

    return trainer_gpu_share(cfg)


def _train_placement(cfg: Any, engine_keys: list[Any] | None) -> tuple[list[Any], Any]:
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from psr_ray.trainer.group import scaling_kwargs, start_bound

    env, failure = start_bound(cfg.trainer)
    os.environ.update(env)
    with tempfile.TemporaryDirectory(prefix="psr_placement_") as storage:
        out = f"{storage}/placement.json"
        trainer = TorchTrainer(
            _report_placement,
            train_loop_config={"engine_keys": engine_keys, "out": out},
            scaling_config=ray.train.ScalingConfig(**scaling_kwargs(cfg.trainer, _trainer_share(cfg))),
            torch_config=TorchConfig(backend="gloo"),  # the stub: NCCL needs a GPU
            run_config=ray.train.RunConfig(
                storage_path=storage, name="placement", failure_config=ray.train.FailureConfig(**failure)
            ),  # fmt: skip
        )
        trainer.fit()
        seen = json.loads(Path(out).read_text())
    return seen["ranks"], seen["fed"]


def unplaceable(cluster: LogicalCluster, start_timeout_s: float = 3.0) -> dict[str, Any]:
    """The defect's hang, bounded: engines holding 0.4 + 0.4 of the only GPU and a trainer asking a whole GPU
    (colocate off), through the real `train_sft`: how long until it fails, and what it says."""
    import ray.data

    import psr_ray.engines.actor as actor_module
    from psr_ray.engines.pool import start_engine_pool
    from psr_ray.trainer.group import train_sft

    topology = TOPOLOGIES[1]
    cfg = load_config(topology, "weight_sync.colocate=false", f"trainer.start_timeout_s={start_timeout_s}",
                      "trainer.max_failures=1")  # fmt: skip
    cluster.use(topology)
    actor_module.EngineActor = PlacedEngine  # type: ignore[misc]
    pools = [start_engine_pool(cfg, role, "stand-in-model") for role in ("rollout", "judge")]  # held: alive
    rows = ray.data.from_items([{"prompt_text": "1+1=", "target_text": "2"}])
    started = time.perf_counter()
    error = None
    with tempfile.TemporaryDirectory(prefix="psr_unplaceable_") as out:
        try:
            train_sft(cfg, model_path="stand-in-model", dataset=rows, output_dir=out)
        except Exception as err:
            error = f"{type(err).__name__}: {err}"
    del pools
    return {"seconds": round(time.perf_counter() - started, 1), "error": error,
            "start_timeout_s": start_timeout_s, "tries": cfg.trainer.max_failures + 1}  # fmt: skip


def main(out: str, names: list[str]) -> None:
    """Every topology named (all when none), and `unplaceable` unless names leave it out; JSON into `out`."""
    chosen = [t for t in TOPOLOGIES if not names or t.name in names]
    started = time.perf_counter()
    with LogicalCluster() as cluster:
        results: dict[str, Any] = {"topologies": [observe(cluster, t) for t in chosen]}
        if not names or "unplaceable" in names:
            results["unplaceable"] = unplaceable(cluster)
    results["seconds"] = round(time.perf_counter() - started, 1)  # the cluster's start and stop included
    Path(out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])


def problems(seen: dict[str, Any]) -> list[str]:
    """What in one topology's observation breaks its placement contract (empty: placed as configured):
    every GPU share as asked, engines and trainer ranks on their node groups, whole GPUs never shared, and
    colocated, trainer rank i on the GPU of engine i of each role, feeding exactly those engines."""
    out = []
    label = seen["nodes"].get
    ranks = seen["trainer"]
    for engine in seen["engines"]:
        asked, host = engine["asked"], engine["host"]
        procs = engine["shards"] if asked["tensor_parallel_size"] > 1 else [host]
        share = 1.0 if asked["tensor_parallel_size"] > 1 else asked["num_gpus_per_engine"]
        for proc in procs:
            if proc["resources"].get("GPU") != share or len(proc["gpu_ids"]) != 1:
                out.append(f"{engine['name']} holds {proc['resources']} on GPUs {proc['gpu_ids']}, asked {share:g} GPU")
            if proc["cuda_visible_devices"] != ",".join(proc["gpu_ids"]):
                out.append(f"{engine['name']} sees CUDA_VISIBLE_DEVICES={proc['cuda_visible_devices']}, not its GPU")
        if asked["node_resource"] and label(host["node_id"]) != "engine node":
            out.append(f"{engine['name']} is on the {label(host['node_id'])}, not an engine node")
    whole = [(p["node_id"], p["gpu_ids"][0]) for e in seen["engines"] for p in e["shards"]]
    whole += [(p["node_id"], p["gpu_ids"][0]) for e in seen["engines"] if e["host"]["resources"].get("GPU") == 1.0
              for p in [e["host"]]]  # fmt: skip
    whole += [(r["node_id"], r["gpu_ids"][0]) for r in ranks if r["resources"].get("GPU", 1.0) == 1.0]
    if len(set(whole)) != len(whole):
        out.append(f"whole GPUs given twice: {sorted(whole)}")
    for rank in ranks:
        if rank["resources"].get("GPU", 1.0) != seen["trainer_share"] or len(rank["gpu_ids"]) != 1:
            out.append(f"trainer rank {rank['rank']} holds {rank['resources']}, asked {seen['trainer_share']:g} GPU")
    if seen["colocate"]:
        out += _colocation_problems(seen)
    elif any(label(r["node_id"]) not in ("trainer node", "gpu node") for r in ranks):
        out.append("a trainer rank is off the trainer nodes")
    return out


def _colocation_problems(seen: dict[str, Any]) -> list[str]:
    out = []
    ranks = sorted(seen["trainer"], key=lambda r: r["rank"])
    by_role: dict[str, list[Any]] = {}
    for index, engine in enumerate(seen["engines"]):
        by_role.setdefault(engine["role"], []).append((index, engine))
    if len({(r["node_id"], r["gpu_ids"][0]) for r in ranks}) != len(ranks):
        out.append("two trainer ranks on one GPU")
    for i, rank in enumerate(ranks):
        own = [index for role in by_role.values() for index, engine in role[i : i + 1]]
        for index in own:
            engine = seen["engines"][index]
            if engine["gpu_placement"] != rank["gpu_key"]:
                out.append(f"trainer rank {i} is on {rank['gpu_key']}, {engine['name']} on {engine['gpu_placement']}")
        if not isinstance(seen["fed"], list) or sorted(seen["fed"][i]) != sorted(own):
            out.append(f"trainer rank {i} would feed {seen['fed']}, not engines {own} on its GPU")
    return out
