"""Elastic engine pools: `psr-ray scale RUN_DIR --rollout N --judge M` resizes the pools of a running job.

The driver runs a named control actor (`psr-control`, no CPU) in its Ray namespace holding the engine
count asked for per role, and records where to find it (`<run folder>/ray.json`: the cluster's GCS address
and the namespace). `psr-ray scale` joins that cluster and sets the counts; nothing else changes there.

`Elastic.tick` runs between the search scheduler's turns (a read of the target at most once a second) and
moves the pools toward it:

  grow    a new engine `psr-<role>-<i>` starts on the policy being searched (its HF folder and version);
          it joins the pool, and takes requests, only once `ready()` reports that version (one that reports
          another, e.g. the policy moved on while it loaded, reloads it first). Growing and shrinking change
          the pool's tail only, so the scheduler's engine indices never shift.
  shrink  the last engines stop taking calls at once; each leaves the pool when its calls have come back
          (their answers are taken as usual: nothing is lost, nothing sent twice). Its actor stays alive until
          `kill_retired` (after the iteration's weight sync, whose sender was built with it) and is taken back
          if the pool grows again meanwhile.

The counts reached are written to `<run folder>/scale.json` and a resumed run starts its pools at them;
each change is one console line and an event in the iteration's search summary (state.json: `scale_events`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from psr_ray.config import UserError
from psr_ray.engines.pool import EnginePool, engine_name
from psr_ray.runtime import console

log = logging.getLogger(__name__)

CONTROL_NAME = "psr-control"
ADDRESS_FILE = "ray.json"
SCALE_FILE = "scale.json"
POLL_S = 1.0


class ScaleControl:
    """The control actor: the engine count asked for per role (set by `psr-ray scale`, read by the driver)."""

    def __init__(self, targets: dict[str, int]):
        self._targets = dict(targets)

    def set(self, targets: dict[str, int]) -> dict[str, int]:
        self._targets.update(targets)
        return dict(self._targets)

    def get(self) -> dict[str, int]:
        return dict(self._targets)


def scaled_counts(folder: str | Path) -> dict[str, int]:
    """The engine counts a run reached by `psr-ray scale` (`scale.json`), {} if never scaled."""
    path = Path(folder) / SCALE_FILE
    return {k: int(v) for k, v in json.loads(path.read_text()).items()} if path.is_file() else {}


def start_pools(session: Any, policy_dir: str, policy_version: int, counts: dict[str, int]) -> tuple[Any, Any]:
    """The run's rollout and judge pools on `policy_dir`, as many engines as `counts` (`scaled_counts`) says,
    else as configured."""
    return tuple(  # type: ignore[return-value]
        session.start_pool(role, policy_dir, policy_version=policy_version, num_engines=counts.get(role))
        for role in ("rollout", "judge")
    )


@dataclasses.dataclass
class _Pending:
    """A new engine on its way into its pool: waiting on `ref` (`ready()`, or a reload then `ready()`)."""

    role: str
    index: int
    actor: Any
    ref: Any
    reloading: bool = False
    version: int | None = None  # the version its last ready() reported


class RayEngines:
    """What `Elastic` does to engine actors, through Ray (unit tests give it a fake)."""

    def __init__(self, launch: Callable[[str, int, str, int], Any]):
        self.launch = launch  # (role, index, model_path, policy_version) -> handle: RunSession.start_engine

    def ready(self, actor: Any) -> Any:
        return actor.ready.remote()

    def reload(self, actor: Any, policy_dir: str, policy_version: int) -> Any:
        return actor.update_weights_from_path.remote(policy_dir, policy_version=policy_version)

    def result(self, ref: Any) -> tuple[bool, Any]:
        """(done, value) without waiting; a failed call raises."""
        import ray

        done, _ = ray.wait([ref], timeout=0)
        return (True, ray.get(ref)) if done else (False, None)

    def kill(self, actor: Any) -> None:
        import ray

        ray.kill(actor)


class Elastic:
    """Moves the engine pools toward the counts `read_target()` returns (see the module doc). `pools` maps
    a role to the pools its engines serve: rollout's are also the judge's when the judge runs on them."""

    def __init__(
        self,
        pools: dict[str, list[EnginePool]],
        engines: Any,
        *,
        read_target: Callable[[], dict[str, int]],
        persist: Callable[[dict[str, int]], None] = lambda counts: None,
        poll_s: float = POLL_S,
    ):
        self.pools, self.engines = pools, engines
        self.read_target, self.persist, self.poll_s = read_target, persist, poll_s
        self.target = {role: len(group[0]) for role, group in pools.items()}
        self.events: list[dict[str, Any]] = []
        self._pending: dict[str, list[_Pending]] = {role: [] for role in pools}
        self._retired: dict[str, dict[int, Any]] = {role: {} for role in pools}
        self._next_poll = 0.0

    def tick(self, policy_version: int, policy_dir: str) -> None:
        """One reconcile step; cheap unless something changes. Call it between scheduling turns."""
        now = time.monotonic()
        if now >= self._next_poll:
            self._next_poll = now + self.poll_s
            self._apply(self.read_target(), policy_version, policy_dir)
        for role in self.pools:
            self._advance(role, policy_version, policy_dir)
            self._remove_drained(role)

    def summary(self) -> dict[str, Any]:
        """The changes since the last call, for the search summary (state.json), {} if none."""
        events, self.events = self.events, []
        return {"scale_events": events, "engines": dict(self.target)} if events else {}

    def kill_retired(self) -> None:
        """Ends the engines that left their pool (call when no weight sender holds them any more)."""
        for retired in self._retired.values():
            for actor in retired.values():
                self.engines.kill(actor)
            retired.clear()

    # ---- the steps ------------------------------------------------------------------------------------

    def _apply(self, targets: dict[str, int], policy_version: int, policy_dir: str) -> None:
        for role, count in targets.items():
            if role not in self.pools or count == self.target[role]:
                continue
            group, pending = self.pools[role], self._pending[role]
            self._event(role, "target", f"{self.target[role]} -> {count} engines", count=count)
            self.target[role] = count
            while pending and pending[-1].index >= count:  # asked for, then no longer wanted
                cancelled = pending.pop()
                self._retired[role][cancelled.index] = cancelled.actor
            for pool in group:  # the tail beyond `count` drains; a draining one asked for again serves again
                pool.serving = min(count, len(pool))
            for index in range(len(group[0]) + len(pending), count):
                actor = self._retired[role].pop(index, None) or self.engines.launch(
                    role, index, policy_dir, policy_version
                )
                pending.append(_Pending(role, index, actor, self.engines.ready(actor)))
            self.persist(dict(self.target))

    def _advance(self, role: str, policy_version: int, policy_dir: str) -> None:
        group, pending = self.pools[role], self._pending[role]
        for item in [item for item in pending if item.ref is not None]:
            try:
                done, value = self.engines.result(item.ref)
            except Exception as err:  # its constructor failed (no model, no memory): the pool stays as it is
                pending.remove(item)
                self._event(role, "failed", f"{engine_name(role, item.index)} did not start: {err}", index=item.index)
                continue
            if not done:
                continue
            if item.reloading:
                item.reloading, item.ref = False, self.engines.ready(item.actor)
            else:
                item.version, item.ref = value["policy_version"], None
        for item in pending:  # ready at another version (the policy moved on while it loaded): reload first
            if item.ref is None and item.version != policy_version:
                item.reloading, item.ref = True, self.engines.reload(item.actor, policy_dir, policy_version)
        while pending and pending[0].ref is None and pending[0].index == len(group[0]):
            item = pending.pop(0)
            name = engine_name(role, item.index)
            for pool in group:
                pool.add(item.actor, name)
            self._event(role, "added", f"{name} serves policy {policy_version}; it takes requests now",
                        index=item.index, policy_version=policy_version)  # fmt: skip

    def _remove_drained(self, role: str) -> None:
        group = self.pools[role]
        while len(group[0]) > group[0].serving and all(pool.in_flight[-1] == 0 for pool in group):
            index = len(group[0]) - 1
            actor = [pool.pop_drained() for pool in group][0]
            self._retired[role][index] = actor
            self._event(role, "removed", f"{engine_name(role, index)} drained (its calls answered); removed",
                        index=index)  # fmt: skip

    def _event(self, role: str, kind: str, text: str, **fields: Any) -> None:
        print(f"[psr_ray] scale {role}: {text}", flush=True)
        self.events.append({"role": role, "event": kind, "time": time.time(), **fields})


# ---- the driver's side and the command's side --------------------------------------------------------


def start_elastic(session: Any, folder: str | Path, rollout: EnginePool, judge: EnginePool) -> Elastic:
    """The run's `Elastic`, its control actor started and found through `<folder>/ray.json`."""
    import ray

    from psr_ray.runtime.durable import write_atomic

    shared = session.cfg.judge.num_engines == 0  # the judge pool is the rollout engines
    pools = {"rollout": [rollout, judge]} if shared else {"rollout": [rollout], "judge": [judge]}
    counts = {role: len(group[0]) for role, group in pools.items()}
    # One per namespace, as the engines' names: a later run in this process (tests) takes it over, reset.
    control: Any = ray.remote(ScaleControl).options(name=CONTROL_NAME, num_cpus=0, get_if_exists=True).remote(counts)
    ray.get(control.set.remote(counts), timeout=60)
    context = ray.get_runtime_context()
    write_atomic(
        Path(folder) / ADDRESS_FILE, json.dumps({"address": context.gcs_address, "namespace": context.namespace})
    )

    def persist(counts: dict[str, int]) -> None:  # a judge on the rollout engines has as many (session.start_pool)
        write_atomic(Path(folder) / SCALE_FILE, json.dumps(counts | ({"judge": counts["rollout"]} if shared else {})))

    def read_target() -> dict[str, int]:  # a control actor that does not answer leaves the pools as they are
        try:
            return ray.get(control.get.remote(), timeout=10)
        except (ray.exceptions.RayError, TimeoutError) as err:
            log.warning("the scale control actor %s did not answer (%s); engine counts unchanged", CONTROL_NAME, err)
            return {}

    def launch(role: str, index: int, model_path: str, policy_version: int) -> Any:
        return session.start_engine(role, index, model_path, policy_version=policy_version)

    return Elastic(pools, RayEngines(launch), read_target=read_target, persist=persist)


def request_scale(
    folder: str, targets: dict[str, int], *, address: str | None = None
) -> tuple[dict[str, int], list[str]]:
    """`psr-ray scale`: checks the request against the run's stored config, joins the run's cluster
    (`address`, else the one in `<folder>/ray.json`) and sets its control actor's targets; returns them all,
    and a warning when the cluster's nodes cannot hold the run at those counts (the new engines then wait,
    pending, until a node with room joins: an autoscaler's, or one a user adds)."""
    import ray

    from psr_ray.pipeline.capacity import cluster_nodes, describe, placement_errors, run_demands
    from psr_ray.pipeline.run_dir import stored_config

    if not (Path(folder) / "state.json").is_file():
        raise UserError(f"{folder}: no state.json there: not a psr-ray run folder, or its run has not started yet")
    cfg = stored_config(folder)
    for role, count in targets.items():
        if count < 1:
            raise UserError(f"--{role} must be >= 1, got {count}")
    if "judge" in targets and cfg.judge.num_engines == 0:
        raise UserError("this run's judge runs on its rollout engines (judge.num_engines: 0): scale --rollout")
    if cfg.weight_sync.colocate:
        raise UserError("weight_sync.colocate pins one engine of each role per trainer GPU: its pools cannot be scaled")
    path = Path(folder) / ADDRESS_FILE
    if not path.is_file():
        raise UserError(
            f"{path} not found: is a `psr-ray run` of {folder} running (it writes it once its engines start)?"
        )
    recorded = json.loads(path.read_text())
    with console.ray_notices_to_log(log):  # not Ray's node-wide notices under the command's one line
        try:
            ray.init(address=address or recorded["address"], namespace=recorded["namespace"], log_to_driver=False,
                     logging_level=logging.WARNING)  # fmt: skip  # not Ray's "Connecting to ..." lines: one line
            control: Any = ray.get_actor(CONTROL_NAME)
        except (ConnectionError, ValueError) as err:
            raise UserError(
                f"cannot reach the run's control actor ({err}); is the run of {folder} still running?"
            ) from None
        try:
            now = ray.get(control.set.remote(targets), timeout=30)
            nodes = cluster_nodes()
            errors = placement_errors(run_demands(cfg, counts=now), nodes)
        finally:
            ray.shutdown()
    warnings = [f"the cluster ({describe(nodes)}) cannot hold the run at these counts yet: {'; '.join(errors)}; "
                "the new engines start once a node with room joins"] if errors else []  # fmt: skip
    return now, warnings
