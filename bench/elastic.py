"""Search throughput before and after `psr-ray scale` adds rollout engines, in one search (issue 26 section 6).

    python bench/elastic.py [--num-problems 400] [--add 1] [--model-dir DIR] [k=v ...]

One search pass (`generate_pairs`) on the tiny test model (built into a temporary folder unless --model-dir),
one rollout and one judge engine, with the run's elastic pools (pipeline/elastic.py) ticking between turns as
in `psr-ray run`. Once a quarter of the problems have finished, the control actor is asked for `1 + --add`
rollout engines (what `psr-ray scale --rollout N` sets); the new engines load while the search goes on and
join when ready. Throughput is measured from the engines' own counters (vLLM's generated tokens, every engine)
and from the problems finished, over three windows of the same search: "before" from the first finished problem
(the search's start for tokens) to the request, "loading" from the request until the last new engine joined (it
loads on the same machine meanwhile), and "after" from then until 90% of the problems have finished (the tail,
where fewer problems are left than the engines can take, is left out). The headline is after / before.
Writes bench/results/elastic.md.

On the 2-core development box every engine shares the same two cores: a new engine adds a queue, not compute,
so the ratio there says how much of an engine's time per call was latency. On a cluster the new engines bring
their own GPUs or nodes.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def generated_tokens(ray, engines) -> float:
    return sum(s["generation_tokens"] for s in ray.get([e.engine_stats.remote() for e in engines]))


def rate(events: list[float], start: float, end: float) -> float:
    return sum(1 for t in events if start < t <= end) / (end - start) if end > start else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-problems", type=int, default=400)
    parser.add_argument("--add", type=int, default=1, help="rollout engines added mid-search")
    parser.add_argument("--model-dir", help="an HF model folder (default: the tiny test model, built here)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "elastic.md"))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    from psr_ray.pipeline.elastic import CONTROL_NAME, start_elastic
    from psr_ray.pipeline.search_stage import generate_pairs
    from psr_ray.pipeline.session import RunSession
    from psr_ray.testing import build_tiny_model, tiny_cfg

    work = Path(tempfile.mkdtemp(prefix="psr_bench_elastic_"))
    model_dir = args.model_dir or build_tiny_model(str(work / "model"))
    cfg = tiny_cfg(model_dir, work / "run", "rollout.num_engines=1", "judge.num_engines=1",
                   "search.max_problems_in_flight=8", *args.overrides)  # fmt: skip
    session = RunSession(cfg)
    (work / "run").mkdir()
    problems = session.load_problems(limit=args.num_problems)
    ray = session.start_ray(trainer=False)
    rollout, judge = session.start_pool("rollout", policy_version=1), session.start_pool("judge", policy_version=1)
    elastic = start_elastic(session, work / "run", rollout, judge)
    control = ray.get_actor(CONTROL_NAME)
    target = 1 + args.add
    finished: list[float] = []
    marks: dict[str, float] = {}

    def on_turn() -> None:
        elastic.tick(1, session.model_path)
        now = time.monotonic()
        if "asked" not in marks and len(finished) >= len(problems) // 4:
            marks["asked"], marks["load_asked"] = now, os.getloadavg()[0]
            marks["tokens_at_ask"] = generated_tokens(ray, rollout.actors + judge.actors)
            ray.get(control.set.remote({"rollout": target}))
        if "joined" not in marks and len(rollout) == target:
            marks["joined"], marks["load_joined"] = now, os.getloadavg()[0]
            marks["tokens_at_join"] = generated_tokens(ray, rollout.actors + judge.actors)

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
        "# Search throughput before and after adding rollout engines (one search)",
        "",
        f"Command: `{' '.join(['bench/elastic.py', *sys.argv[1:]])}`. Machine: {platform.machine()}, "
        f"{os.cpu_count()} CPU cores, no GPU. Model: the tiny test model; {len(problems)} problems, "
        f"{cfg.search.max_problems_in_flight} in flight; 1 rollout + 1 judge engine, +{args.add} rollout engine(s) "
        f"asked for once {len(problems) // 4} problems had finished ({marks['asked'] - start:.1f} s into the search), "
        f"joined after {joined - marks['asked']:.1f} s (their load time). The search took {summary.seconds:.1f} s, "
        f"{summary.pairs_total} pairs, {summary.stale_results} stale results.",
        "",
        "| figure | before | loading | after | after / before |",
        "| --- | --- | --- | --- | --- |",
        *[f"| {name} | {b:.2f} | {mid:.2f} | {a:.2f} | {a / b:.2f}x |" for name, (b, mid, a) in rows.items()],
        "",
        "Before: from the first finished problem (problems) or the search's start (tokens) to the request; "
        "loading: from the request to the join; after: from the join to 90% of the problems finished (the tail, "
        "with fewer problems left than engines take, is left out). The machine is shared with other work, so "
        "each window's figure carries its noise.",
        "",
        "Scale events (what the run's console and state.json show):",
        "",
        *[f"- {e['event']} {e.get('index', '')} {e.get('count', '')}".rstrip() for e in events],
        "",
        f"Load average (1 min) at the search's start, the request, the join and the end: {load_text}. On this "
        "machine every engine shares the same CPU cores with each other and with whatever else runs, so a new "
        "engine adds no compute: the ratio measures that contention (and the loading engine's), not what a "
        "cluster gains, where each new engine brings its own GPU or node.",
    ]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    elastic.kill_retired()
    return 0


if __name__ == "__main__":
    sys.exit(main())
