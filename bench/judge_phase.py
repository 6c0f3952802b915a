"""Can a judge-only phase teach the init's direct judge its verdicts? Writes bench/results/judge_phase.md.

bench/judge_fit.py found the init's SFT (M0 -> M1, one epoch of IFT + EFT at `trainer.sft_learning_rate`)
fitted no verdict: P(A) 0.876 on "A" and "B" rows alike. This fits the init's own EFT rows alone
(`eft_train.parquet`, direct-mode prompts, each pair in both orders) on top of a start model (default M_ift, the
init's IFT-only SFT: the phase a staged init would add after it), at a higher lr for several epochs, and after
each epoch measures:
  - the judge on the init's held-out pairs (M1's own oracle-labelled candidates; never trained on): P(A) read at
    the verdict position of the runtime's direct prompt, both orders; pair accuracy is the search's rule (both
    orders' mean P(good) > 0.5), as `labelled.score_judgments` scores an engine's judgments;
  - the fit: rows of the EFT training set whose P(label) > 0.5;
  - what the phase costs the solver: the mean per-token NLL of held-out problems' reference solutions (the IFT
    rows' format), against the start model's and M1's.
The loop is judge_cues.train (plain torch, fp32, AdamW with the trainer's settings, target tokens' mean CE).

    flock /tmp/psr_heavy.lock .venv/bin/python bench/judge_phase.py --init-dir ~/.cache/psr_ray/init/<key>
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def solver_nll(model: Any, tokenizer: Any, rows: list[dict[str, Any]]) -> float:
    """Mean per-token NLL of the rows' targets (IFT format: reference solutions)."""
    import torch

    from psr_ray.trainer.batches import collate_sft

    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            encoded, _ = collate_sft(tokenizer, [row], max_seq_len=2048)
            mask = encoded["loss_mask"][:, 1:].bool()
            logits = model(input_ids=encoded["input_ids"]).logits[:, :-1][mask]
            nll = torch.nn.functional.cross_entropy(logits.float(), encoded["input_ids"][:, 1:][mask], reduction="sum")
            total, count = total + float(nll), count + int(mask.sum())
    return total / count


def measure(model: Any, tokenizer: Any, data: dict[str, Any]) -> dict[str, Any]:
    from judge_fit import judge_probs

    from psr_ray.core.stats import wilson

    started = time.perf_counter()
    held = judge_probs(model, tokenizer, data["heldout_prompts"])  # good as A, then good as B, per pair
    pairs = len(held) // 2
    pairs_right = sum((held[i] + 1 - held[i + 1]) / 2 > 0.5 for i in range(0, len(held), 2))
    judgments_right = sum((p > 0.5) == (i % 2 == 0) for i, p in enumerate(held))
    fit = judge_probs(model, tokenizer, [r["prompt_text"] for r in data["eft_rows"]])
    fit_right = sum((p > 0.5) == r["target_text"].startswith("A") for p, r in zip(fit, data["eft_rows"], strict=True))
    low, high = wilson(pairs_right, pairs)
    return {
        "pairs": pairs, "pairs_right": pairs_right, "pair_ci": [low, high],
        "judgments_right": judgments_right, "share_a": sum(p > 0.5 for p in held) / len(held),
        "fit_right": fit_right, "fit_rows": len(fit), "solver_nll": solver_nll(model, tokenizer, data["solver_rows"]),
        "measure_s": time.perf_counter() - started,
    }  # fmt: skip


def load_data(init_dir: Path, num_solver_rows: int) -> dict[str, Any]:
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from psr_ray import config as C
    from psr_ray.config import JudgeMode
    from psr_ray.core.prompts import render_judge_prompt
    from psr_ray.init_data.build import ift_rows, load_worked_problems, read_pairs
    from psr_ray.init_data.labelled import judge_requests
    from psr_ray.pipeline.init_stage import read_result

    result = read_result(init_dir)
    if result is None:
        raise SystemExit(f"{init_dir}: no finished init there (its init.json is missing)")
    tokenizer = AutoTokenizer.from_pretrained(result.hf_dir)
    requests, _ = judge_requests([p.pair for p in read_pairs(result.data_files["heldout_pairs"])])
    cfg = C.load([str(C.DEFAULT_CONFIG)])
    wanted = set(result.heldout_problem_ids)
    problems = [p for p in load_worked_problems(cfg.data.source, split=cfg.data.split, seed=cfg.data.shuffle_seed)
                if p.problem_id in wanted][:num_solver_rows]  # fmt: skip
    return {
        "result": result,
        "eft_rows": pq.read_table(result.data_files["eft_train"]).to_pylist(),
        "heldout_prompts": [
            render_judge_prompt(tokenizer, r.question, r.prefix, r.step_a, r.step_b, mode=JudgeMode.DIRECT)
            for r in requests
        ],  # fmt: skip
        "solver_rows": ift_rows(tokenizer, problems),
    }


def row(name: str, m: dict[str, Any]) -> str:
    low, high = m["pair_ci"]
    return (f"| {name} | {100 * m['pairs_right'] / m['pairs']:.1f} [{100 * low:.1f}, {100 * high:.1f}] (n={m['pairs']}) | "
            f"{100 * m['judgments_right'] / (2 * m['pairs']):.1f} | {100 * m['share_a']:.1f} | "
            f"{m['fit_right']}/{m['fit_rows']} | {m['solver_nll']:.4f} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init-dir", required=True, help="a built init folder (holds init.json)")
    parser.add_argument("--start", choices=("m_ift", "m1"), default="m_ift", help="the model the phase starts from")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--solver-rows", type=int, default=48, help="held-out reference solutions for the NLL")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(HERE / "results" / "judge_phase.md"))
    args = parser.parse_args()
    import torch
    from judge_cues import train
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(os.cpu_count() or 1)
    init = Path(args.init_dir).expanduser()
    data = load_data(init, args.solver_rows)
    result = data["result"]
    start = result.ift_hf_dir if args.start == "m_ift" else result.hf_dir
    if not start:
        raise SystemExit(f"{init}: this init has no M_ift (it was built without EFT)")
    started = time.perf_counter()
    lines: list[str] = []
    measured: dict[str, Any] = {}
    for name, path in (("M1 (the init's)", result.hf_dir), (f"start: {args.start}", start)):
        if name.startswith("M1") and args.start == "m1":
            continue
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        measured[name] = measure(model, AutoTokenizer.from_pretrained(path), data)
        lines.append(row(name, measured[name]))
        print(lines[-1], flush=True)
        del model

    def on_epoch(epoch: int, policy: Any, tokenizer: Any) -> None:
        name = f"{args.start} + judge phase, epoch {epoch}"
        measured[name] = measure(policy, tokenizer, data)
        lines.append(row(name, measured[name]))
        print(lines[-1], flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        rows_json = Path(tmp) / "rows.json"
        rows_json.write_text(json.dumps([{"prompt_text": r["prompt_text"], "target_text": r["target_text"]}
                                         for r in data["eft_rows"]]))  # fmt: skip
        fit = train(start, str(rows_json), str(Path(tmp) / "out"), lr=args.lr, epochs=args.epochs,
                    batch=args.batch, seed=args.seed, max_steps=None, on_epoch=on_epoch)  # fmt: skip
    losses = [h["loss"] for h in fit["history"]]
    per_epoch = len(losses) // args.epochs
    text = "\n".join([
        "# A judge-only phase on the init's EFT rows (bench/judge_phase.py)", "",
        f"Command: `{' '.join(['bench/judge_phase.py', *sys.argv[1:]])}`. Init: `{init}` ({len(data['eft_rows'])} EFT rows, "
        f"{len(data['heldout_prompts']) // 2} held-out pairs, {len(data['solver_rows'])} held-out reference solutions). "
        f"Start: {args.start} (`{start}`). Phase: lr {args.lr:g} (warm-up {fit['warmup_steps']} steps, then constant), "
        f"{args.epochs} epochs of batch {args.batch} = {fit['steps']} optimizer steps, {sum(h['step_s'] for h in fit['history']):.0f} s of steps "
        f"({fit['threads']} threads; {fit['wall_s']:.0f} s with the per-epoch measurements). Mean loss per epoch: "
        + ", ".join(f"{sum(losses[i:i + per_epoch]) / per_epoch:.3f}" for i in range(0, per_epoch * args.epochs, per_epoch))
        + f". Whole script {time.perf_counter() - started:.0f} s. See the docstring for what is read.", "",
        "| model | judge pair accuracy % [95% CI] | judgment accuracy % | share A % | EFT rows fitted | solver NLL / token |",
        "|---|---|---|---|---|---|", *lines, "",
    ])  # fmt: skip
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
