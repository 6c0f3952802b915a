"""Search throughput before and after a node joins and `psr-ray scale` adds rollout engines on it, in one search
(issue 26 section 6), on a simulated multi-node Ray cluster.

    python bench/elastic.py [--num-problems 400] [--add-rollout 1] [--add-judge 1] [--model-dir DIR] [k=v ...]

The cluster (`ray.cluster_utils.Cluster`): a head of 0 CPUs and an engine node `{CPU: 2, psr_engine: 2}`
holding one rollout and one judge engine of the tiny test model (built into a temporary folder unless
--model-dir). Each engine node is given its own CPU core (the processes a node starts inherit the CPU affinity
it was started with): on a cluster every node brings its own compute, and on this 2-core box a second node
on the same cores would add none. One search pass (`generate_pairs`) runs with the run's elastic pools
(pipeline/elastic.py) ticking between turns as in `psr-ray run`. Once a quarter of the problems have finished,
a second engine node joins (on the other core) and the control actor is asked for `1 + --add-rollout` rollout
and `1 + --add-judge` judge engines (what `psr-ray scale --rollout N --judge M` sets); they start on the new node, load while the search goes on, and join
when ready. Throughput comes from the engines' own counters (vLLM's generated tokens, every engine) and from
the problems finished, over three windows of the same search: "before" from the first finished problem (the
search's start for tokens) to the request, "loading" from the request until the last new engine joined, and
"after" from then until 90% of the problems have finished (the tail, where fewer problems are left than the
engines can take, is left out). The headline is after / before. Writes bench/results/elastic.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


ENGINE_NODE = {"num_cpus": 2, "resources": {"psr_engine": 2}}


def generated_tokens(ray, engines) -> float:
    return sum(s["generation_tokens"] for s in ray.get([e.engine_stats.remote() for e in engines]))


def rate(events: list[float], start: float, end: float) -> float:
    return sum(1 for t in events if start < t <= end) / (end - start) if end > start else float("nan")


def add_node_on(cluster, core: int):
    """A new engine node whose processes run on `core` only (they inherit the affinity it starts with)."""
    every = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {core})
    try:
        return cluster.add_node(**ENGINE_NODE)
    finally:
        os.sched_setaffinity(0, every)


def engine_cores(ray_address: str) -> dict[str, str]:
    """Each live engine's allowed CPUs, read from its process (/proc), by engine name."""
    from ray.util.state import list_actors

    cores = {}
    for actor in list_actors(address=ray_address, filters=[("class_name", "=", "EngineActor")], detail=True):
        if actor.state == "ALIVE" and actor.pid:
            status = Path(f"/proc/{actor.pid}/status").read_text()
            cores[actor.name] = next(x.split()[1] for x in status.splitlines() if x.startswith("Cpus_allowed_list"))
    return cores


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-problems", type=int, default=400)
    parser.add_argument("--add-rollout", type=int, default=1, help="rollout engines added mid-search, on the new node")
    parser.add_argument("--add-judge", type=int, default=1, help="judge engines added mid-search, on the new node")
    parser.add_argument("--model-dir", help="an HF model folder (default: the tiny test model, built here)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "elastic.md"))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if (os.cpu_count() or 1) < 2 or args.add_rollout + args.add_judge > ENGINE_NODE["resources"]["psr_engine"]:
        print("needs 2 CPU cores, and at most 2 engines added (the new node's psr_engine units)", file=sys.stderr)
        return 1
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    work = Path(tempfile.mkdtemp(prefix="psr_bench_elastic_"))
    os.environ["RAY_TMPDIR"] = str(work)  # a cluster of its own: no other Ray user here finds it
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": True,
                                                            "dashboard_port": 0})  # fmt: skip
    try:
        add_node_on(cluster, 0)
        cluster.wait_for_nodes()
        return measure(args, cluster, work)
    finally:
        import ray

        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(work, ignore_errors=True)


def measure(args, cluster, work: Path) -> int:
    from psr_ray.pipeline.elastic import CONTROL_NAME, start_elastic
    from psr_ray.pipeline.search_stage import generate_pairs
    from psr_ray.pipeline.session import RunSession
    from psr_ray.testing import build_tiny_model, tiny_cfg

    model_dir = args.model_dir or build_tiny_model(str(work / "model"))
    cfg = tiny_cfg(model_dir, work / "run", "rollout.num_engines=1", "judge.num_engines=1",
                   "search.max_problems_in_flight=8", f"run.ray_address={cluster.address}",
                   "rollout.node_resource=psr_engine", "judge.node_resource=psr_engine",
                   "run.require_shared_storage=false", *args.overrides)  # fmt: skip
    session = RunSession(cfg)
    (work / "run").mkdir()
    problems = session.load_problems(limit=args.num_problems)
    ray = session.start_ray(trainer=False)
    rollout, judge = session.start_pool("rollout", policy_version=1), session.start_pool("judge", policy_version=1)
    elastic = start_elastic(session, work / "run", rollout, judge)
    control = ray.get_actor(CONTROL_NAME)
    target = {"rollout": 1 + args.add_rollout, "judge": 1 + args.add_judge}
    finished: list[float] = []
    marks: dict[str, float] = {}
    cores: dict[str, str] = {}

    def on_turn() -> None:
        elastic.tick(1, session.model_path)
        now = time.monotonic()
        if "asked" not in marks and len(finished) >= len(problems) // 4:
            marks["asked"], marks["load_asked"] = now, os.getloadavg()[0]
            marks["tokens_at_ask"] = generated_tokens(ray, rollout.actors + judge.actors)
            add_node_on(cluster, 1)
            ray.get(control.set.remote(target))
        if "joined" not in marks and (len(rollout), len(judge)) == (target["rollout"], target["judge"]):
            marks["joined"], marks["load_joined"] = now, os.getloadavg()[0]
            marks["tokens_at_join"] = generated_tokens(ray, rollout.actors + judge.actors)
            cores.update(engine_cores(cluster.address))

    def on_pairs(result) -> None:
        finished.append(time.monotonic())
        if len(finished) == int(0.9 * len(problems)):  # the "after" window ends here: the tail is left out
            marks["tokens_at_90"] = generated_tokens(ray, rollout.actors + judge.actors)

    tokens0 = generated_tokens(ray, rollout.actors + judge.actors)
    marks["load_start"] = os.getloadavg()[0]
    start = time.monotonic()
    summary = generate_pairs(cfg, problems, iteration=1, policy_version=1, rollout=rollout, judge=judge,
                             output_dir=str(work / "run"), on_pairs=on_pairs, on_turn=on_turn)  # fmt: skip
    if "joined" not in marks:
        print("the new engines did not join before the search ended; use more --num-problems", file=sys.stderr)
        return 1
    first, asked, joined = finished[0], marks["asked"], marks["joined"]
    after_end = finished[int(0.9 * len(problems)) - 1]
    if after_end <= joined:
        print("the new engines joined after 90% of the search; use more --num-problems", file=sys.stderr)
        return 1
    rows = {
        "problems/s": (rate(finished, first, asked), rate(finished, asked, joined), rate(finished, joined, after_end)),
        "generated tokens/s (all engines)": (
            (marks["tokens_at_ask"] - tokens0) / (asked - start),
            (marks["tokens_at_join"] - marks["tokens_at_ask"]) / (joined - asked),
            (marks["tokens_at_90"] - marks["tokens_at_join"]) / (after_end - joined),
        ),
    }
    events = elastic.summary()["scale_events"]
    load_text = " / ".join(f"{marks[k]:.1f}" for k in ("load_start", "load_asked", "load_joined")) + (
        f" / {os.getloadavg()[0]:.1f}"
    )
    lines = [
        "# Search throughput before and after a node joins with new engines (one search)",
        "",
        f"Command: `{' '.join(['bench/elastic.py', *sys.argv[1:]])}`. Machine: {platform.machine()}, "
        f"{os.cpu_count()} CPU cores, no GPU. A simulated multi-node Ray cluster (`ray.cluster_utils.Cluster`): "
        "a head of 0 CPUs and an engine node `{CPU: 2, psr_engine: 2}` on core 0; once "
        f"{len(problems) // 4} problems had finished ({marks['asked'] - start:.1f} s into the search), a second "
        f"engine node joined on core 1 and the pools were asked for +{args.add_rollout} rollout and "
        f"+{args.add_judge} judge engine(s), which started on "
        f"it and joined after {joined - marks['asked']:.1f} s (node start and model load). Model: "
        f"{'`' + args.model_dir + '`' if args.model_dir else 'the tiny test model'}; {len(problems)} problems, {cfg.search.max_problems_in_flight} in flight; 1 rollout + 1 judge "
        f"engine before. The search took {summary.seconds:.1f} s, {summary.pairs_total} pairs, "
        f"{summary.stale_results} stale results.",
        "",
        "| figure | before | loading | after | after / before |",
        "| --- | --- | --- | --- | --- |",
        *[f"| {name} | {b:.2f} | {mid:.2f} | {a:.2f} | {a / b:.2f}x |" for name, (b, mid, a) in rows.items()],
        "",
        "Before: from the first finished problem (problems) or the search's start (tokens) to the request; "
        "loading: from the request to the join; after: from the join to 90% of the problems finished (the tail, "
        "with fewer problems left than engines take, is left out).",
        "",
        "Each engine's allowed CPU cores, read from its process when the new engines joined: "
        + ", ".join(f"{name} {cpus}" for name, cpus in sorted(cores.items()))
        + ". A node's processes inherit the affinity it was started with: each node brings its own core, as "
        "each node of a cluster brings its own GPU; the driver (the search's scheduler) runs on either core.",
        "",
        "Scale events (what the run's console and state.json show):",
        "",
        *[
            f"- {e['role']} {e['event']}: " + (f"{e['count']} engines" if "count" in e else f"engine {e.get('index')}")
            for e in events
        ],
        "",
        f"Load average (1 min) at the search's start, the request, the join and the end: {load_text}.",
    ]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    elastic.kill_retired()
    return 0


if __name__ == "__main__":
    sys.exit(main())
