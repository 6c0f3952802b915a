"""Did the init's SFT fit its own EFT verdicts? Writes bench/results/judge_fit.md.

For M0 and M1 of a built init (`run.cache_dir/init/<key>`), on that init's EFT training rows
(`eft_train.parquet`: the SFT's own direct-mode judge prompts, each pair in both orders, half "A" half "B"):
the relative probability of "A" against "B" at the verdict position, read as the SFT's loss reads it (the
prompt's tokens, then the target's first token; HF forward, fp32, one row at a time). A judge that learned
its rows puts P(A) high on "A" rows and low on "B" rows; one that learned only a prior puts every row at the
same value. Rows right = P(label) > 0.5.

    .venv/bin/python bench/judge_fit.py --init-dir ~/.cache/psr_ray/init/<key>
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def verdict_probs(model_dir: str, rows: list[dict]) -> list[float]:
    """P(A) / (P(A) + P(B)) at each row's verdict position."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return judge_probs(model, tokenizer, [row["prompt_text"] for row in rows])


def judge_probs(model: Any, tokenizer: Any, prompts: list[str]) -> list[float]:
    """P(A) / (P(A) + P(B)) at the end of each prompt (the direct judge's verdict position)."""
    import torch

    a, b = (tokenizer.encode(x, add_special_tokens=False)[0] for x in ("A", "B"))
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
            logps = model(ids).logits[0, -1].log_softmax(-1)
            out.append(float(torch.sigmoid(logps[a] - logps[b])))
    return out


def summary(name: str, probs: list[float], labels: list[bool]) -> str:
    from psr_ray.core.stats import wilson

    right = sum((p > 0.5) == is_a for p, is_a in zip(probs, labels, strict=True))
    low, high = wilson(right, len(probs))
    on_a = [p for p, is_a in zip(probs, labels, strict=True) if is_a]
    on_b = [p for p, is_a in zip(probs, labels, strict=True) if not is_a]
    return (f"| {name} | {len(probs)} | {right} ({100 * right / len(probs):.1f} [{100 * low:.1f}, {100 * high:.1f}]) | "
            f"{statistics.mean(on_a):.3f} | {statistics.mean(on_b):.3f} | {min(probs):.3f} | {max(probs):.3f} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init-dir", required=True, help="a built init folder (holds init.json, eft_train.parquet)")
    parser.add_argument("--m0", default=None, help="M0's HF folder (default: the embedded SmolLM2 conversion)")
    parser.add_argument("--out", default=str(HERE / "results" / "judge_fit.md"))
    args = parser.parse_args()
    import pyarrow.parquet as pq
    import torch

    from psr_ray.pipeline.init_stage import read_result
    from psr_ray.runtime.models import resolve_model_path

    torch.set_num_threads(os.cpu_count() or 1)
    init = Path(args.init_dir).expanduser()
    result = read_result(init)
    if result is None:
        raise SystemExit(f"{init}: no finished init there (its init.json is missing)")
    rows = pq.read_table(result.data_files["eft_train"]).to_pylist()
    if not rows:
        raise SystemExit(f"{result.data_files['eft_train']}: no EFT rows")
    labels = [row["target_text"].startswith("A") for row in rows]
    m0 = args.m0 or resolve_model_path("embedded:smollm2-135m-instruct", "~/.cache/psr_ray")
    started = time.perf_counter()
    lines = [summary(name, verdict_probs(path, rows), labels) for name, path in (("M0", m0), ("M1", result.hf_dir))]
    text = "\n".join([
        "# Did the init's SFT fit its own EFT verdicts? (bench/judge_fit.py)", "",
        f"Command: `{' '.join(['bench/judge_fit.py', *sys.argv[1:]])}`. Init: `{init}` "
        f"({len(rows)} EFT rows, {sum(labels)} with the verdict \"A\"). M1: `{result.hf_dir}`. See the script's docstring "
        f"for what is read. {time.perf_counter() - started:.0f} s.", "",
        "| model | rows | rows right [95% CI] | mean P(A) on \"A\" rows | mean P(A) on \"B\" rows | min P(A) | max P(A) |",
        "|---|---|---|---|---|---|---|", *lines, "",
    ])  # fmt: skip
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
