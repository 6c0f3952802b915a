"""Can the cluster place this run? What the run asks of Ray, checked against the cluster's nodes right after
Ray starts and before any engine, init phase or trainer (issue 26: an engine no node could host used to wait
`run.engine_start_timeout_s`, 30 minutes, and then blame a hang).

A run's steady state holds every engine and every trainer worker at once (the search and the training
overlap), so each of them is a *demand*: one Ray bundle of CPUs, GPUs and the node group's custom resource
that must land whole on one node. `placement_errors` packs the demands onto the nodes' totals (first fit,
largest first), names any demand no node can hold and the resource the cluster lacks. Pure: the nodes come
from `ray.nodes()` (`cluster_nodes`). With `run.autoscaling` the cluster may add nodes, so a shortfall is a
warning and a request to the autoscaler rather than an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from psr_ray.config.errors import UserError

# Ray's own bookkeeping resources: never asked for by a run, never worth naming.
_IGNORED = ("memory", "object_store_memory", "node:", "accelerator_type:")


@dataclass(frozen=True)
class Demand:
    what: str  # e.g. "rollout engine 0", "trainer worker 1"
    resources: dict[str, float]


def run_demands(
    cfg: Any, *, engines: bool = True, trainer: bool = True, counts: dict[str, int] | None = None
) -> list[Demand]:
    """Every bundle the run holds at once: engines (one per tensor-parallel shard) and trainer workers (a
    command that starts only one of them asks only for those). `counts` are engine counts per role that
    replace `<role>.num_engines` (what `psr-ray scale` set: pipeline/elastic.py)."""
    from psr_ray.engines.pool import colocation_bundles, engine_resources
    from psr_ray.trainer.group import scaling_kwargs, trainer_gpu_share

    demands = []
    colocate = cfg.weight_sync.colocate
    if colocate and engines:  # one bundle per GPU holds that GPU's engines (engines/pool.py)
        demands += [Demand(f"colocated engines on GPU {i}", b) for i, b in enumerate(colocation_bundles(cfg))]
    roles = (("rollout", "judge") if cfg.judge.num_engines > 0 else ("rollout",)) if engines and not colocate else ()
    for role in roles:
        section = getattr(cfg, role)
        for i in range((counts or {}).get(role, section.num_engines)):
            ask = engine_resources(section)
            if section.tensor_parallel_size > 1:  # vLLM's workers take one bundle per shard
                demands += [Demand(f"{role} engine {i} shard {s}", ask) for s in range(section.tensor_parallel_size)]
            else:
                demands.append(Demand(f"{role} engine {i}", ask))
    if trainer:
        scaling = scaling_kwargs(cfg.trainer, trainer_gpu_share(cfg))
        worker = dict(scaling["resources_per_worker"])
        if scaling["use_gpu"]:
            worker.setdefault("GPU", 1.0)  # Ray Train's default for use_gpu without an explicit GPU share
        demands += [Demand(f"trainer worker {i}", worker) for i in range(scaling["num_workers"])]
    return [Demand(d.what, {k: v for k, v in d.resources.items() if v > 0}) for d in demands]


def cluster_nodes() -> list[dict[str, float]]:
    """The total resources of every live node of the connected Ray cluster."""
    from psr_ray.runtime.cluster import live_nodes

    return [dict(node["Resources"]) for node in live_nodes()]


def placement_errors(demands: list[Demand], nodes: list[dict[str, float]]) -> list[str]:
    """What keeps `demands` off `nodes` (empty when they all fit together), one phrase per problem."""
    free = [{k: v for k, v in node.items() if not k.startswith(_IGNORED)} for node in nodes]
    errors: list[str] = []
    unplaced = []
    for demand in sorted(demands, key=lambda d: -sum(d.resources.values())):
        if not any(_fits(demand.resources, node) for node in free):
            unplaced.append(demand)
            continue
        node = next(n for n in free if _fits(demand.resources, n))
        for k, v in demand.resources.items():
            node[k] -= v
    if not unplaced:
        return errors
    totals = _sum(nodes)
    asked = _sum([d.resources for d in demands])
    for resource in sorted(asked):
        if asked[resource] > totals.get(resource, 0.0) + 1e-9:
            errors.append(f"the run asks for {_num(asked[resource])} {resource} in all, the cluster has "
                          f"{_num(totals.get(resource, 0.0))}")  # fmt: skip
    lone = [d for d in unplaced if not any(_fits(d.resources, n) for n in nodes)]
    for d in lone:
        errors.append(f"no node can hold {d.what} ({_bundle(d.resources)})")
    if not errors:  # each fits somewhere alone, not all together
        names = ", ".join(d.what for d in unplaced[:4]) + (" ..." if len(unplaced) > 4 else "")
        errors.append(f"{names} do not fit beside the rest on the cluster's nodes")
    return errors


def describe(nodes: list[dict[str, float]]) -> str:
    """`3 nodes: 16 CPU, 8 GPU, 4 psr_engine, ...` (what `psr-ray submit` shows before it submits)."""
    totals = {k: v for k, v in _sum(nodes).items() if not k.startswith(_IGNORED)}
    return f"{len(nodes)} node{'s' if len(nodes) != 1 else ''}: " + ", ".join(
        f"{_num(v)} {k}" for k, v in sorted(totals.items(), key=lambda kv: (kv[0] not in ("CPU", "GPU"), kv[0]))
    )


def check_capacity(
    cfg: Any,
    nodes: list[dict[str, float]] | None = None,
    *,
    engines: bool = True,
    trainer: bool = True,
    ask_autoscaler: bool = True,
    counts: dict[str, int] | None = None,
) -> list[str]:
    """Raises a ValueError naming what is missing when the run cannot be placed on the cluster; with
    `run.autoscaling` asks the autoscaler for it instead (`ask_autoscaler`: the job's driver asks, connected;
    `psr-ray submit` only warns) and returns the warnings. `counts`: as in `run_demands`."""
    nodes = cluster_nodes() if nodes is None else nodes
    demands = run_demands(cfg, engines=engines, trainer=trainer, counts=counts)
    errors = placement_errors(demands, nodes)
    if not errors:
        return []
    where = describe(nodes)
    if cfg.run.autoscaling:
        if not ask_autoscaler:
            return [f"the cluster ({where}) cannot place this run yet: {'; '.join(errors)}; the run will ask its "
                    "autoscaler for the nodes (run.autoscaling)"]  # fmt: skip
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[d.resources for d in demands])
        return [f"the cluster ({where}) cannot place this run yet: {'; '.join(errors)}; asked its autoscaler for "
                f"the nodes (run.autoscaling), waiting up to run.engine_start_timeout_s="
                f"{cfg.run.engine_start_timeout_s:g} s"]  # fmt: skip
    raise UserError(f"this run cannot be placed on the cluster ({where}): {'; '.join(errors)}; add nodes with "
                    "those resources, lower the run's asks (num_engines, num_*_per_engine, trainer.num_workers), "
                    "or set run.autoscaling=true if an autoscaler adds nodes")  # fmt: skip


def _fits(ask: dict[str, float], node: dict[str, float]) -> bool:
    return all(node.get(k, 0.0) + 1e-9 >= v for k, v in ask.items())


def _sum(bundles: list[dict[str, float]]) -> dict[str, float]:
    total: dict[str, float] = {}
    for bundle in bundles:
        for k, v in bundle.items():
            total[k] = total.get(k, 0.0) + v
    return total


def _bundle(resources: dict[str, float]) -> str:
    return ", ".join(f"{k}: {_num(v)}" for k, v in sorted(resources.items()))


def _num(value: float) -> str:
    return f"{value:g}"
