"""Held-out judge pairs as the init builds them, without Ray: a model's sampled candidate steps at one random
step of each problem (after its reference steps), a right and a wrong one by the exact oracle, written as an
init's heldout_pairs.parquet for `bench/judge_accuracy.py --pairs`.

    .venv/bin/python bench/heldout_pairs.py --model <M1 hf dir> --num-problems 200 --out /tmp/heldout_pairs.parquet
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from pathlib import Path

from psr_ray.config import EMBEDDED_MODEL, InitConfig, RolloutConfig
from psr_ray.data.problems import load_problems
from psr_ray.engines.actor import EngineActor
from psr_ray.engines.api import ProposeRequest
from psr_ray.engines.settings import EngineSettings
from psr_ray.init_data.build import pair_rows, write_parquet
from psr_ray.init_data.candidates import OraclePair, best_and_worst, step_sites
from psr_ray.init_data.labelled import LabelledPair
from psr_ray.oracle.exact import why_wrong
from psr_ray.oracle.judge import label_steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=EMBEDDED_MODEL, help="the proposer (the init samples M1's candidates)")
    parser.add_argument("--cache-dir", default="~/.cache/psr_ray")
    parser.add_argument("--source", default="embedded:arith", help="a source with an exact step check")
    parser.add_argument("--split", default="test")
    parser.add_argument("--num-problems", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from psr_ray.runtime.models import resolve_model_path

    init, rollout = InitConfig(), RolloutConfig()  # the init's held-out sampling
    problems = load_problems(args.source, split=args.split, seed=args.seed, limit=args.num_problems).problems
    sites = step_sites(problems, seed=args.seed)
    engine = EngineActor(EngineSettings(model_path=resolve_model_path(args.model, args.cache_dir), role="rollout"),
                         name="bench-proposer")  # fmt: skip
    started = time.perf_counter()
    found = asyncio.run(engine.propose(
        [ProposeRequest(s.problem.question, s.prefix, s.index + 1) for s in sites],
        num_candidates=init.num_candidates, temperature=init.temperature, top_p=rollout.top_p,
        max_tokens=rollout.max_step_tokens, seed=[(args.seed + i) * 1_000 for i in range(len(sites))],
    ))  # fmt: skip
    rng, pairs, num_right = random.Random(args.seed), [], 0
    for site, candidates in zip(sites, found, strict=True):
        labels = label_steps(site.problem, site.prefix, candidates.steps)
        num_right += sum(labels)
        picked = best_and_worst(candidates.steps, labels, rng)
        if picked is not None:
            pair = LabelledPair(site.problem.question, site.prefix, *picked)
            why = why_wrong(site.problem, site.index, picked[1]) or ""
            pairs.append(OraclePair(site.problem.problem_id, pair, len(candidates.steps), sum(labels), why))
    write_parquet(pair_rows(pairs), Path(args.out))
    counts = {"sites": len(sites), "candidates": sum(len(c.steps) for c in found), "right": num_right,
              "pairs": len(pairs), "propose_s": round(time.perf_counter() - started, 1)}  # fmt: skip
    Path(args.out).with_suffix(".counts.json").write_text(json.dumps(counts) + "\n")
    print(f"wrote {args.out}: {counts}")


if __name__ == "__main__":
    main()
