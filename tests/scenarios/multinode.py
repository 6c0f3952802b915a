"""The real `psr-ray run` on a simulated multi-node cluster (issue 26): `ray.cluster_utils.Cluster` with a head
of 0 CPUs (as in the cluster files), an engine node `{CPU: 2, psr_engine: 2}` and a trainer node
`{CPU: 4, psr_trainer: 2}`, the tiny config joining it through `run.ray_address`, its engines and trainer pinned
to their node groups. Node loss is real: `Cluster.remove_node(node, allow_graceful=False)` kills the node's
raylet and every process on it, at a moment read from the run (its folder, or a kill window a trainer worker
blocks in: psr_ray.runtime.kill_windows).

Scenarios, run in the order named on one cluster (each leaves the cluster with one engine and one trainer
node again):
  undisturbed       the run to the end; where Ray placed every actor and task (its state API)
  engine_replaced   the engine node lost once the search has started, a new one added: the run recovers
  engine_lost       the engine node lost with no replacement: the run fails within its bound, naming why
  engines_added     `psr-ray scale` adds two rollout engines mid-search, a new engine node takes them, then
                    removes one: nothing lost or duplicated
  raylet_lost       the engine node's raylet killed alone: the product's engine ends itself, a plain actor
                    runs on; the node is then removed and replaced
  trainer_lost      the trainer node lost after the fit's first optimizer step (a worker waits in the
                    `train.after_step` window), no replacement: the run fails within the trainer's bound

    python -m tests.scenarios.multinode OUT.json SCENARIO...   # OUT.json is rewritten after each scenario

tests/multinode/ runs it in a subprocess (a process of its own: the suite's local Ray stays untouched) and
asserts on the JSON.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from psr_ray.config import REPO_ROOT
from psr_ray.runtime import kill_windows
from tests.scenarios import driver_kills as dk

ENGINE_NODE = {"num_cpus": 2, "resources": {"psr_engine": 2}}
TRAINER_NODE = {"num_cpus": 4, "resources": {"psr_trainer": 2}}
MULTI_NODE_OVERRIDES = (
    "rollout.node_resource=psr_engine",
    "judge.node_resource=psr_engine",
    "trainer.node_resource=psr_trainer",
)
# The bounds the node-loss scenarios configure (short, so that the tier stays minutes long).
ENGINE_UNAVAILABLE_TIMEOUT_S = 20
TRAINER_START_TIMEOUT_S = 15
TRAINER_MAX_FAILURES = 1


class SimCluster:
    """The cluster and this process's connection to it, both gone on exit (processes included)."""

    def __enter__(self) -> SimCluster:
        import ray
        from ray.cluster_utils import Cluster

        # A private temp dir: Cluster writes its address where `ray.init()` looks for a cluster to join, and
        # no other Ray user on this machine may find this one (nor this run another's).
        os.environ["RAY_TMPDIR"] = self.temp = tempfile.mkdtemp(prefix="psrmn_", dir="/tmp")
        self.cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": True,
                                                                     "dashboard_port": 0})  # fmt: skip
        try:
            self.head = self.cluster.head_node.node_id
            self.engine_node = self.cluster.add_node(**ENGINE_NODE)
            self.trainer_node = self.cluster.add_node(**TRAINER_NODE)
            self.cluster.wait_for_nodes()
            ray.init(address=self.cluster.address)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        import ray

        ray.shutdown()
        self.cluster.shutdown()  # every node's processes, and the address file
        self.leaked = leftovers(self.temp)
        shutil.rmtree(self.temp, ignore_errors=True)

    @property
    def address(self) -> str:
        return self.cluster.address

    def lose(self, role: str) -> float:
        """Kills the `role` ("engine" or "trainer") node's raylet and processes at once; the time it did."""
        node = self.engine_node if role == "engine" else self.trainer_node
        self.cluster.remove_node(node, allow_graceful=False)
        return time.monotonic()

    def replace(self, role: str) -> float:
        """A fresh `role` node joins (the one lost is not reused); the time it was up."""
        node = self.cluster.add_node(**(ENGINE_NODE if role == "engine" else TRAINER_NODE))
        setattr(self, f"{role}_node", node)
        return time.monotonic()

    def node_ids(self) -> dict[str, str]:
        return {"head": self.head, "engine": self.engine_node.node_id, "trainer": self.trainer_node.node_id}


def leftovers(temp: str, grace_s: float = 15.0) -> list[str]:
    """Processes still running `grace_s` after the cluster's shutdown that were started under it (their
    environment names its temp dir: a lost node's workers, an orphaned engine); killed, and described."""
    mine = f"RAY_TMPDIR={temp}".encode()

    def running() -> dict[int, str]:
        found = {}
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                if int(proc.name) != os.getpid() and mine in (proc / "environ").read_bytes().split(b"\0"):
                    found[int(proc.name)] = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
            except (OSError, ValueError):  # gone meanwhile, or not ours to read
                continue
        return found

    deadline = time.monotonic() + grace_s
    while (left := running()) and time.monotonic() < deadline:
        time.sleep(1.0)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return [f"{pid} {cmd}" for pid, cmd in left.items()]


@dataclass
class Run:
    """One `psr-ray run` and the moments that mattered (time.monotonic())."""

    out: Path
    returncode: int
    log: str
    started: float
    ended: float
    events: dict[str, float]

    def error_lines(self) -> list[str]:
        return [line for line in self.log.splitlines() if line.startswith("psr-ray run")]


def write_config(work: Path, address: str, *extra: str) -> dk.TinyRun:
    """driver_kills' tiny run (4 problems, a Parquet part per finished problem) pinned to the node groups."""
    from omegaconf import OmegaConf

    from psr_ray.testing import build_tiny_model

    model = build_tiny_model(str(work.parent / "tiny_model"))  # one for every scenario
    tiny = dk.write_inputs(model, work, address)
    cfg = OmegaConf.load(tiny.config)
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([*MULTI_NODE_OVERRIDES, *extra]))
    tiny.config.write_text(OmegaConf.to_yaml(cfg))
    return tiny


Step = tuple[Callable[[], bool], Callable[[], dict[str, float]]]


def run_product(tiny: dk.TinyRun, out: Path, kill_dir: Path, *steps: Step, timeout_s: float = 800.0) -> Run:
    """`psr-ray run` to its end; each step `(when, then)` in turn: once `when()` holds (polled), `then()` runs
    and its events are recorded, as are the moments the log first shows each of LOG_MARKS."""
    log_path = out.parent / f"{out.name}.log"
    events: dict[str, float] = {}
    todo = list(steps)
    marks = dict(LOG_MARKS)
    last_read = 0.0
    started = time.monotonic()
    argv = [sys.executable, "-m", "psr_ray.app.cli", "run", "--config", str(tiny.config), f"run.output_dir={out}"]
    with log_path.open("w") as log:
        proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=dk._env(kill_dir), stdout=log, stderr=subprocess.STDOUT)
        try:
            while proc.poll() is None:
                if todo and todo[0][0]():
                    events |= todo.pop(0)[1]()
                if marks and time.monotonic() - last_read > 0.5:
                    last_read, text = time.monotonic(), log_path.read_text(errors="replace")
                    events |= {name: last_read for name, mark in marks.items() if mark in text}
                    marks = {name: mark for name, mark in marks.items() if name not in events}
                if time.monotonic() - started > timeout_s:
                    raise TimeoutError(f"psr-ray run did not end within {timeout_s:.0f} s; see {log_path}")
                time.sleep(0.1)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = log_path.read_text()
    for line in text.splitlines():  # a failed run saves its traceback in /tmp: the log here keeps what is asserted
        if line.startswith(LOG_MARKS["error_line"]) and "(traceback: " in line:
            Path(line.rsplit("(traceback: ", 1)[1].rstrip(")")).unlink(missing_ok=True)
    return Run(out, proc.returncode, text, started, time.monotonic(), events)


# What the run's log shows when it fails (the driver's error line) and when a failed search interrupts the fit.
LOG_MARKS = {"error_line": "psr-ray run failed", "fit_interrupted": "Received SIGINT"}


def search_started(out: Path) -> Callable[[], bool]:
    """Iteration 1's search has begun: its pair writer made the folder (the first engine calls follow)."""
    from psr_ray.data.pairs_io import MANIFEST, pairs_dir

    return lambda: (pairs_dir(str(out), 1) / MANIFEST).is_file()


def placement(sim: SimCluster) -> dict[str, Any]:
    """Every actor and task of the cluster's jobs but this process's: its class or name, node, resources."""
    import ray
    from ray.util.state import list_actors, list_tasks

    mine = ray.get_runtime_context().get_job_id()
    actors = [{"class": a.class_name, "name": a.name, "node": a.node_id, "resources": a.required_resources,
               "state": a.state} for a in list_actors(address=sim.address, detail=True, limit=10_000)
              if a.job_id != mine]  # fmt: skip
    tasks = [{"name": t.name, "node": t.node_id, "resources": t.required_resources, "type": t.type}
             for t in list_tasks(address=sim.address, detail=True, limit=10_000)
             if t.job_id != mine and t.type == "NORMAL_TASK"]  # fmt: skip
    return {"actors": actors, "tasks": tasks}


def summary(run: Run, sim: SimCluster, nodes: dict[str, str] | None = None) -> dict[str, Any]:
    """What a test asserts on: exit, error lines, the run's state.json and pairs (when written), timings."""
    state_path = run.out / "state.json"
    result: dict[str, Any] = {
        "returncode": run.returncode,
        "seconds": round(run.ended - run.started, 1),
        "error_lines": run.error_lines(),
        "log_tail": run.log[-4000:],
        "events": {k: round(v - run.started, 1) for k, v in run.events.items()},
        "ended_after_loss_s": round(run.ended - run.events["lost"], 1) if "lost" in run.events else None,
        "error_after_loss_s": round(run.events["error_line"] - run.events["lost"], 1)
        if {"lost", "error_line"} <= set(run.events)
        else None,
        "nodes": nodes or sim.node_ids(),
        "state": json.loads(state_path.read_text()) if state_path.is_file() else None,
    }
    if run.returncode == 0:
        outcome = dk.outcome(run.out)
        result["outcome"] = {"pairs": outcome.pairs, "num_rows": outcome.num_rows,
                             "done_problems": sorted(outcome.done_problems), "committed": outcome.committed,
                             "trained": outcome.trained, "sync_versions": outcome.sync_versions,
                             "final_version": outcome.final_version, "eval_version": outcome.eval_version}  # fmt: skip
    return result


# ---- the scenarios ---------------------------------------------------------------------------------------


def undisturbed(sim: SimCluster, work: Path) -> dict[str, Any]:
    tiny = write_config(work, sim.address)
    run = run_product(tiny, work / "undisturbed", work / "kill")
    return summary(run, sim) | {"placement": placement(sim)}


def engine_replaced(sim: SimCluster, work: Path) -> dict[str, Any]:
    tiny = write_config(work, sim.address)
    out = work / "engine_replaced"
    before = sim.node_ids()

    def lose_and_replace() -> dict[str, float]:
        lost = sim.lose("engine")
        return {"lost": lost, "replaced": sim.replace("engine")}

    run = run_product(tiny, out, work / "kill", (search_started(out), lose_and_replace))
    return summary(run, sim, before) | {"replacement_node": sim.engine_node.node_id}


def engine_lost(sim: SimCluster, work: Path) -> dict[str, Any]:
    tiny = write_config(work, sim.address, f"run.engine_unavailable_timeout_s={ENGINE_UNAVAILABLE_TIMEOUT_S}")
    out = work / "engine_lost"
    run = run_product(tiny, out, work / "kill", (search_started(out), lambda: {"lost": sim.lose("engine")}))
    result = summary(run, sim) | {"bound_s": ENGINE_UNAVAILABLE_TIMEOUT_S}
    sim.replace("engine")  # for the next scenario
    return result


def trainer_lost(sim: SimCluster, work: Path) -> dict[str, Any]:
    tiny = write_config(work, sim.address, f"trainer.start_timeout_s={TRAINER_START_TIMEOUT_S}",
                        f"trainer.max_failures={TRAINER_MAX_FAILURES}")  # fmt: skip
    out = work / "trainer_lost"
    kill_dir = work / "kill"
    dk.arm(kill_dir, "train.after_step@1")
    window = kill_windows.ready_file(kill_dir, "train.after_step")
    run = run_product(tiny, out, kill_dir, (window.is_file, lambda: {"lost": sim.lose("trainer")}))
    result = summary(run, sim) | {"bound_s": TRAINER_START_TIMEOUT_S * (TRAINER_MAX_FAILURES + 1)}
    sim.replace("trainer")
    return result


# engines_added: a search long enough that two new engines load (with a node joining) and serve within it (at
# load 12 the search ended 17 s after the scale-down: fewer problems would end it before the engines serve).
ADDED_PROBLEMS = 96


def scale_command(out: Path, rollout: int) -> str:
    """`psr-ray scale OUT --rollout N` as a user runs it, in a process of its own (it joins through OUT/ray.json);
    what it printed."""
    argv = [sys.executable, "-m", "psr_ray.app.cli", "scale", str(out), "--rollout", str(rollout)]
    done = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                          env=os.environ | {"OMP_NUM_THREADS": "1"})  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"psr-ray scale failed: {done.stdout}{done.stderr}")
    return done.stdout + done.stderr


def log_shows(out: Path, text: str) -> Callable[[], bool]:
    log_path = out.parent / f"{out.name}.log"
    return lambda: text in log_path.read_text(errors="replace")


def engines_added(sim: SimCluster, work: Path) -> dict[str, Any]:
    """Mid-search, `psr-ray scale --rollout 3` asks for two rollout engines the engine node has no room for
    (they wait, pending), and a second engine node joins: they start there, load the searched policy and take
    requests; once both serve, `psr-ray scale --rollout 2` removes one, which drains its calls first."""
    tiny = write_config(work, sim.address, "data.source=embedded:gsm8k", "search.max_problems_in_flight=2",
                        f"run.prompts_per_iteration=[{ADDED_PROBLEMS}]", "trainer.global_batch_size=32",
                        "trainer.micro_batch_size=16")  # fmt: skip  # 9 optimizer steps: the fit ends soon after the search
    out = work / "engines_added"
    said: dict[str, str] = {}
    added: list[Any] = []

    def grow() -> dict[str, float]:
        said["grow"] = scale_command(out, 3)
        asked = time.monotonic()
        added.append(sim.cluster.add_node(**ENGINE_NODE))
        return {"scaled_up": asked, "node_added": time.monotonic()}

    def shrink() -> dict[str, float]:
        joined = time.monotonic()
        said["shrink"] = scale_command(out, 2)
        return {"joined": joined, "scaled_down": time.monotonic()}

    run = run_product(tiny, out, work / "kill", (search_started(out), grow),
                      (log_shows(out, "psr-rollout-2 serves policy"), shrink))  # fmt: skip
    nodes = sim.node_ids() | ({"added": added[0].node_id} if added else {})
    result = summary(run, sim, nodes) | {"said": said, "placement": placement(sim), "problems": ADDED_PROBLEMS}
    for node in added:  # the cluster as the next scenario expects it
        sim.cluster.remove_node(node, allow_graceful=False)
    return result


# raylet_lost: how long an engine may outlive its node's raylet (runtime/orphans.py polls once a second).
ORPHAN_BOUND_S = 10.0


class Plain:
    """An actor that does not watch its raylet: what a raylet's death leaves running without the watch."""

    def pid(self) -> int:
        return os.getpid()


def raylet_lost(sim: SimCluster, work: Path) -> dict[str, Any]:
    """The engine node's raylet killed alone (its workers left running): the product's engine (EngineActor,
    launched as a run launches it) ends itself, a plain actor beside it runs on."""
    import ray
    from ray._private import ray_constants

    from psr_ray.engines.pool import launch_engine
    from psr_ray.testing import build_tiny_model, tiny_cfg

    model = build_tiny_model(str(work.parent / "tiny_model"))
    cfg = tiny_cfg(model, work / "unused", *MULTI_NODE_OVERRIDES, f"run.ray_address={sim.address}")
    engine = launch_engine(cfg, "rollout", 0, model, policy_version=1)
    ray.get(engine.ready.remote(), timeout=600)
    plain = ray.remote(Plain).options(num_cpus=0, resources={"psr_engine": 1}).remote()
    pids = {
        "engine": ray.get(engine.__ray_call__.remote(lambda self: os.getpid())),
        "plain": ray.get(plain.pid.remote()),
    }
    raylet = sim.engine_node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process
    raylet.kill()
    lost = time.monotonic()
    gone: dict[str, float] = {}
    while time.monotonic() - lost < ORPHAN_BOUND_S + 5:
        gone |= {
            role: round(time.monotonic() - lost, 1) for role, pid in pids.items() if role not in gone and not alive(pid)
        }
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pids["plain"], signal.SIGKILL)
    sim.cluster.remove_node(sim.engine_node, allow_graceful=False)
    sim.replace("engine")
    return {"pids": pids, "gone_after_s": gone, "bound_s": ORPHAN_BOUND_S, "waited_s": ORPHAN_BOUND_S + 5, "events": {}}


def alive(pid: int) -> bool:
    """Whether process `pid` still runs (a zombie has exited: only its reaping is left)."""
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


SCENARIOS = {
    f.__name__: f for f in (undisturbed, engine_replaced, engines_added, raylet_lost, engine_lost, trainer_lost)
}


def main(out: str, names: list[str]) -> None:
    results: dict[str, Any] = {}
    work = Path(tempfile.mkdtemp(prefix="psr_multinode_"))
    started = time.monotonic()
    try:
        with SimCluster() as sim:
            results["cluster_start_s"] = round(time.monotonic() - started, 1)
            for name in names:
                begun = time.monotonic()
                print(f"psr_ray multinode: {name}", file=sys.stderr, flush=True)
                results[name] = SCENARIOS[name](sim, work / name)
                results[name]["scenario_s"] = round(time.monotonic() - begun, 1)
                Path(out).write_text(json.dumps(results, indent=1, default=str))
        results["leaked_processes"] = sim.leaked
        results["seconds"] = round(time.monotonic() - started, 1)
        Path(out).write_text(json.dumps(results, indent=1, default=str))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])


def run_in_subprocess(out_dir: Path, *names: str, timeout_s: float = 850.0) -> dict[str, Any]:
    """`names` in a process of their own (its own cluster beside the suite's local Ray); their JSON."""
    out = out_dir / "multinode.json"
    env = os.environ | {"PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = subprocess.run([sys.executable, "-m", "tests.scenarios.multinode", str(out), *names], env=env,
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout_s)  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    seen = json.loads(out.read_text())
    for name in names:  # the timings, shown by `pytest -rP`
        keys = ("scenario_s", "seconds", "ended_after_loss_s", "error_after_loss_s", "gone_after_s")
        times = {k: seen[name][k] for k in keys if seen[name].get(k) is not None}
        print(f"{name}: {times} events {seen[name]['events']}")
    print(f"cluster start {seen['cluster_start_s']} s, all {seen['seconds']} s, leaked {seen['leaked_processes']}")
    return seen


def node_of(seen: dict[str, Any], node_id: str | None) -> str | None:
    """ "head", "engine" or "trainer" for a node id of the scenario's cluster (None: not one of them)."""
    return next((role for role, node in seen["nodes"].items() if node == node_id), None)
