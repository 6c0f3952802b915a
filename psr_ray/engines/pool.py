"""A pool of engine actors of one role: starting the named actors, and the call accounting a scheduler needs.

`start_engine_pool(cfg, "rollout", model_path)` starts (or finds) the named actors `psr-rollout-<i>` sized by
`cfg.rollout` and returns an `EnginePool`. The pool tracks, per engine, the calls in flight, consecutive
failures and a back-off deadline, so the search scheduler asks it which engine may take the next call and
tells it how each call ended; nothing else writes that state. An engine that stays unreachable longer than
its bound (`run.engine_unavailable_timeout_s`, timed from its first lost call until a call succeeds) fails
the run naming it: a node lost with no replacement leaves its engines RESTARTING with nowhere to go.
`psr-ray scale` (pipeline/elastic.py) grows and shrinks a running pool at its tail only (`add`, `serving`,
`pop_drained`), so the indices of the calls in flight stay valid.
"""

from __future__ import annotations

import math
import time
from typing import Any

from psr_ray.config import EnginePoolConfig
from psr_ray.config.errors import UserError

# Calls one engine holds at once. Engines batch continuously (engines/batching.py), so the scheduler sends a
# problem per call and its problems in flight bound the work; this only caps what one engine may hold.
MAX_CALLS_PER_ENGINE = 256


class EnginePool:
    """Engine actor handles of one role with their in-flight calls, failures and back-off."""

    def __init__(
        self,
        role: str,
        actors: list[Any],
        *,
        max_restarts: int,
        names: list[str] | None = None,
        unavailable_timeout_s: float = math.inf,
        resources: dict[str, float] | None = None,
    ):
        if not actors:
            raise ValueError(f"no {role} engines given; start them with start_engine_pool(cfg, {role!r}, model_path)")
        self.role = role
        self.actors = list(actors)
        self._names = names
        self.in_flight = [0] * len(actors)
        self._failures = [0] * len(actors)
        self._not_before = [0.0] * len(actors)
        self._max_failures = max_restarts + 1
        self._unavailable_since: list[float | None] = [None] * len(actors)  # first lost call of an outage
        self._unavailable_timeout_s = unavailable_timeout_s
        self._resources = resources or {}  # what one engine asks of a node: named when none is left to give it
        self.serving = len(actors)  # engines [serving, len) are draining (`psr-ray scale` shrank the pool)

    def __len__(self) -> int:
        return len(self.actors)

    @property
    def names(self) -> list[str]:
        """The engines' actor names, `psr-<role>-<i>` (the rollout engines' for a judge pool on them)."""
        return self._names or [engine_name(self.role, i) for i in range(len(self.actors))]

    def pick(self) -> int | None:
        """The least-loaded engine that may take another call now, or None."""
        now = time.monotonic()
        free = [
            i
            for i in range(self.serving)
            if self.in_flight[i] < MAX_CALLS_PER_ENGINE
            and self._failures[i] < self._max_failures
            and self._not_before[i] <= now
        ]
        return min(free, key=lambda i: (self.in_flight[i], i)) if free else None

    def started(self, i: int) -> None:
        self.in_flight[i] += 1

    def succeeded(self, i: int) -> None:
        self.in_flight[i] -= 1
        self._failures[i] = 0
        self._unavailable_since[i] = None

    def failed(self, i: int, *, restarting: bool = False, reason: str = "") -> bool:
        """A call lost to a dead engine. `restarting` (ActorUnavailableError): Ray is already restarting it,
        which takes as long as an engine start; that is waited out, not counted as another death, up to
        the unavailability bound. Returns True for the first lost call of an outage (worth a log line)."""
        self.in_flight[i] -= 1
        now = time.monotonic()
        since = self._unavailable_since[i]
        first = since is None
        if since is None:
            since = self._unavailable_since[i] = now
        if now - since > self._unavailable_timeout_s:
            raise RuntimeError(self._unavailable_error(i, now - since, reason))
        if restarting:
            self._not_before[i] = now + 1.0
            return first
        self._failures[i] += 1
        self._not_before[i] = now + 0.5 * self._failures[i]  # let Ray restart it
        if all(f >= self._max_failures for f in self._failures):
            raise RuntimeError(f"every {self.role} engine died {self._max_failures} times in a row; see their logs")
        return first

    def _unavailable_error(self, i: int, seconds: float, reason: str) -> str:
        """One line: the engine out for longer than its bound (and the pool's others out too), and why Ray cannot
        bring it back when the live nodes say so (none provides a resource it asks for: its node is gone)."""
        others = [n for j, n in enumerate(self.names) if j != i and self._unavailable_since[j] is not None]
        head = (f"{self.role} engine {self.names[i]}{' (and ' + ', '.join(others) + ')' if others else ''} has been "
                f"unavailable for {seconds:.0f} s (run.engine_unavailable_timeout_s={self._unavailable_timeout_s:g}; "
                f"last error: {reason or 'none'})")  # fmt: skip
        if not self._resources:  # not started by start_engine_pool (tests): nothing known to check
            return f"{head}: its node is gone and Ray has nowhere to restart it, or it keeps dying"
        from psr_ray.runtime.cluster import why_unplaceable

        why = why_unplaceable(self._resources)
        if why is None:
            return f"{head}: the cluster has a node for it, so it keeps dying; see its log"
        return f"{head}: {why}; its node is gone and Ray has nowhere to restart it: add a node that has them"

    def hold(self, i: int) -> bool:
        """Sends no calls to engine i until `release(i)` (it is reloading weights); False if already held."""
        if self._not_before[i] == math.inf:
            return False
        self._not_before[i] = math.inf
        return True

    def release(self, i: int) -> None:
        self._not_before[i] = 0.0

    def add(self, actor: Any, name: str) -> None:
        """Appends a started engine that serves the current policy (`psr-ray scale`, pipeline/elastic.py);
        it takes calls from the next pick. Only with no engine draining: indices stay those of the calls."""
        assert self.serving == len(self.actors), "add() while engines drain"
        if self._names is not None:
            self._names.append(name)
        self.actors.append(actor)
        self.in_flight.append(0)
        self._failures.append(0)
        self._not_before.append(0.0)
        self._unavailable_since.append(None)
        self.serving += 1

    def pop_drained(self) -> Any:
        """Removes the last engine, draining (index >= `serving`) with no call in flight; returns its handle."""
        assert len(self.actors) > self.serving and self.in_flight[-1] == 0, "pop_drained() of a busy engine"
        for column in (self.in_flight, self._failures, self._not_before, self._unavailable_since):
            column.pop()
        if self._names is not None:
            self._names.pop()
        return self.actors.pop()


def engine_name(role: str, index: int) -> str:
    return f"psr-{role}-{index}"


def engine_resources(section: EnginePoolConfig) -> dict[str, float]:
    """What one engine of `section` asks of one node (of a tensor-parallel engine, one shard's bundle; vLLM's
    workers take one `{GPU: 1, CPU: 1}` each), zero asks left out."""
    if section.tensor_parallel_size > 1:
        ask = {"GPU": 1.0, "CPU": 1.0} | node_group_request(section, shard=True)
    else:
        ask = {"CPU": section.num_cpus_per_engine, "GPU": section.num_gpus_per_engine} | node_group_request(section)
    return {k: v for k, v in ask.items() if v > 0}


def node_group_request(section: EnginePoolConfig, *, shard: bool = False) -> dict[str, float]:
    """The node-group resource (`node_resource`) one engine asks for, {} when the pool is not pinned: one
    unit per GPU it takes (a whole engine on CPU is one unit); with `shard`, one tensor-parallel bundle's."""
    if not section.node_resource:
        return {}
    units = 1.0 if shard or section.num_gpus_per_engine <= 0 else section.num_gpus_per_engine
    return {section.node_resource: units}


COLOCATION_GROUP = "psr-colocate"


def colocation_bundles(cfg: Any) -> list[dict[str, float]]:
    """`weight_sync.colocate`: one placement-group bundle per GPU holding engine i of each role, trainer rank
    i's GPU (config.topology.colocated_shares): the engines' share of it, their CPUs and node-group units."""
    from psr_ray.config.topology import colocated_shares

    engine_share, _ = colocated_shares(cfg)
    bundle: dict[str, float] = {"GPU": engine_share, "CPU": 0.0}
    for role in ("rollout", "judge") if cfg.judge.num_engines > 0 else ("rollout",):
        section: EnginePoolConfig = getattr(cfg, role)
        bundle["CPU"] += section.num_cpus_per_engine
        for key, units in node_group_request(section).items():
            bundle[key] = bundle.get(key, 0.0) + units
    return [dict(bundle) for _ in range(cfg.trainer.num_workers)]


def _colocation_group(cfg: Any, lifetime: str | None) -> Any:
    """The colocated engines' placement group (made by the first pool started, found by the next)."""
    from ray.util.placement_group import get_placement_group, placement_group

    try:
        group = get_placement_group(COLOCATION_GROUP)
    except ValueError:  # not made yet
        group = placement_group(colocation_bundles(cfg), strategy="PACK", name=COLOCATION_GROUP, lifetime=lifetime)
    if not group.wait(timeout_seconds=cfg.run.engine_start_timeout_s):
        raise TimeoutError(f"{COLOCATION_GROUP}: no room for its {cfg.trainer.num_workers} GPU shares "
                           f"{colocation_bundles(cfg)[0]} within {cfg.run.engine_start_timeout_s:.0f} s "
                           "(run.engine_start_timeout_s)")  # fmt: skip
    return group


def start_engine_pool(
    cfg: Any, role: str, model_path: str, *, policy_version: int = 0, lifetime: str | None = None
) -> EnginePool:
    """Starts (or reuses) the named `role` engine actors `psr-<role>-<i>` and waits until they are ready.
    With `judge.num_engines: 0` the judge pool is the rollout engines (the same policy; start those first).

    Resources come from `cfg.<role>`: CPUs and GPUs per engine, plus its `node_resource` (the engine node
    group's custom resource) if set; with `tensor_parallel_size > 1` each engine gets a placement group of one
    `{GPU: 1, CPU: 1}` bundle (plus a node-resource unit) per shard, which vLLM's Ray executor fills. With
    `weight_sync.colocate` engine i of each role takes its share inside bundle i of the colocation group
    (`colocation_bundles`), one GPU each: the GPU whose rest only trainer rank i's share fits.
    An actor of the same name already alive in the namespace is reused (a restarted driver finds its
    engines; pass `lifetime="detached"` for engines that outlive the driver). `max_task_retries=0`: a
    call lost to an engine crash fails, and the scheduler re-queues its requests on a live engine.
    """
    import ray

    if role == "judge" and cfg.judge.num_engines == 0:  # the judge runs on the rollout engines (started first)
        names = [engine_name("rollout", i) for i in range(cfg.rollout.num_engines)]
        return EnginePool(role, [ray.get_actor(n) for n in names], max_restarts=cfg.rollout.max_restarts, names=names,
                          unavailable_timeout_s=cfg.run.engine_unavailable_timeout_s,
                          resources=engine_resources(cfg.rollout))  # fmt: skip
    from psr_ray.runtime.waits import get_all

    section: EnginePoolConfig = getattr(cfg, role)
    actors = [launch_engine(cfg, role, index, model_path, policy_version=policy_version, lifetime=lifetime)
              for index in range(section.num_engines)]  # fmt: skip
    names = [engine_name(role, i) for i in range(len(actors))]
    try:
        infos = get_all([a.ready.remote() for a in actors], labels=names, timeout_s=cfg.run.engine_start_timeout_s,
                        what="ready() after starting (run.engine_start_timeout_s)")  # fmt: skip
    except ray.exceptions.RayActorError as err:  # its constructor failed: the model could not be loaded, ...
        cause = str(err.__cause__ or err).strip().splitlines()
        raise RuntimeError(f"a {role} engine failed to start with {model_path}: {cause[-1] if cause else err}") from err
    for info in infos:
        if info["model"] != model_path:
            raise UserError(
                f"actor {info['name']!r} already exists in this Ray namespace with model {info['model']!r}, "
                f"not {model_path!r}; kill it (ray.kill) or use another namespace"
            )
    return EnginePool(role, actors, max_restarts=section.max_restarts,
                      unavailable_timeout_s=cfg.run.engine_unavailable_timeout_s,
                      resources=engine_resources(section) if not cfg.weight_sync.colocate else None)  # fmt: skip


def launch_engine(
    cfg: Any, role: str, index: int, model_path: str, *, policy_version: int = 0, lifetime: str | None = None
) -> Any:
    """Starts (or finds) the named engine actor `psr-<role>-<index>` on `model_path` serving `policy_version`
    and returns its handle at once (its `ready()` answers once its model is loaded); see `start_engine_pool`."""
    import ray

    from psr_ray.engines.actor import EngineActor
    from psr_ray.engines.settings import engine_env, engine_settings
    from psr_ray.runtime.memory import ENGINE_NAME_ENV

    settings = engine_settings(cfg, role, model_path)
    section: EnginePoolConfig = getattr(cfg, role)
    name = engine_name(role, index)
    options: dict[str, Any] = {
        "name": name,
        "get_if_exists": True,
        "lifetime": lifetime,
        "max_restarts": section.max_restarts,
        "max_task_retries": 0,
        # The name in its environment lets psr_ray.runtime.memory attribute the process's memory to this engine.
        "runtime_env": {"env_vars": engine_env(settings) | {ENGINE_NAME_ENV: name}},
    }
    if cfg.weight_sync.colocate:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        options.update(num_cpus=section.num_cpus_per_engine, num_gpus=section.num_gpus_per_engine,
                       resources=node_group_request(section),
                       scheduling_strategy=PlacementGroupSchedulingStrategy(
                           placement_group=_colocation_group(cfg, lifetime), placement_group_bundle_index=index))  # fmt: skip
    elif settings.tensor_parallel_size > 1:
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundles = [{"GPU": 1, "CPU": 1} | node_group_request(section, shard=True)] * settings.tensor_parallel_size
        group = placement_group(bundles, strategy="PACK", name=f"{name}-pg", lifetime=lifetime)
        if not group.wait(timeout_seconds=cfg.run.engine_start_timeout_s):  # GPUs that never free up
            raise TimeoutError(f"{name}: no room for its {len(bundles)} GPU bundles within "
                               f"{cfg.run.engine_start_timeout_s:.0f} s (run.engine_start_timeout_s)")  # fmt: skip
        # The host actor takes no GPU itself; vLLM's Ray workers take one bundle each.
        options.update(
            num_cpus=0,
            num_gpus=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=group, placement_group_capture_child_tasks=True, placement_group_bundle_index=0
            ),
        )
    else:
        options.update(
            num_cpus=section.num_cpus_per_engine,
            num_gpus=section.num_gpus_per_engine,
            resources=node_group_request(section),
        )
    return ray.remote(EngineActor).options(**options).remote(settings, name=name, policy_version=policy_version)
