"""A judge cue a 135M model can learn? Recompute-then-compare (issue 13 section 4b). Writes bench/results/judge_cues.md.

M1 (the init's SFT model) judges at chance on its own held-out step pairs (the init's heldout_pairs.parquet:
M1's candidates, oracle-labelled; nearly all bad steps are wrong results, "112 + 72 = 284"). The cue tested:
in `explain` mode the EFT target (psr_ray/init_data/build.py explain_pair) first redoes each step's equation
("Step A: 112 + 72 = 184, it writes 284.") and only then names the wrong step, so the verdict becomes a
comparison of two numbers the judge has just written instead of a one-token verification.

Arms, each measured with the product's own code (EngineActor.judge, init_data.labelled.judge_requests and
score_judgments; greedy; both orders of every pair; 95% Wilson intervals; per error category):
  M1          the init's model as it is, `direct` and `explain` mode;
  explain     M1 fine-tuned on K rows in explain mode (eft_rows: the product's EFT prompts and targets);
  direct      (the control, `--arms explain,direct`) the same K rows with direct-verdict targets.
Training rows come from the arithmetic generator's train split minus every held-out problem (by id and by
question text): a reference step against the same step with a wrong result (moved by 1-9, by 10 or 20, or one
digit changed; `\\boxed{}` moved with it), the reason from the step oracle (`oracle.exact.why_wrong`), both
orders. Fine-tuning is a plain single-process torch loop (fp32, AdamW with the trainer's ADAMW_PARAMS and
clipping, mean cross-entropy over target tokens, a linear warm-up then constant lr). Each engine and each fit
runs in its own subprocess (its memory goes back before the next starts); finished stages are kept as JSON
under --work, so a rerun continues where it stopped.

    flock /tmp/psr_heavy.lock .venv/bin/python bench/judge_cues.py --rows 256 --lr 2e-5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_INIT = "~/.cache/psr_ray/init/e215d6581e185f8e"
_WRONG_RESULT = re.compile(r" is not \S+ but \S+$")  # oracle.exact.why_wrong's arithmetic-error sentence
_RESULT = re.compile(r"=\s*(\d+)")
# One recomputation as explain_pair writes it: "Step A: 112 + 72 = 184, it writes 284."
_CHECK = re.compile(r"Step ([AB]): (-?[\d.]+ [+\-xX*/] -?[\d.]+) = (\S+?), it writes (\S+?)(?=[.,\s]|$)")


# ---- data -----------------------------------------------------------------------------------------------


def category(why_bad: str) -> str:
    return "wrong result" if _WRONG_RESULT.search(why_bad) else "other"


def heldout(init_dir: Path) -> tuple[list[Any], dict[str, Any]]:
    from psr_ray.init_data.build import read_pairs

    info = json.loads((init_dir / "init.json").read_text())
    return read_pairs(init_dir / "heldout_pairs.parquet"), info


def wrong_result(step: str, rng: random.Random) -> str | None:
    """`step` with its last equation's result (and a `\\boxed{}` holding it) changed; None without one."""
    matches = list(_RESULT.finditer(step))
    if not matches:
        return None
    match = matches[-1]
    value = int(match.group(1))
    kind = rng.random()
    if kind < 0.5:
        wrong = value + rng.choice([-1, 1]) * rng.randint(1, 9)
    elif kind < 0.75:
        wrong = value + rng.choice([-20, -10, 10, 20])
    else:
        digits = list(str(value))
        i = rng.randrange(len(digits))
        digits[i] = rng.choice([d for d in "0123456789" if d != digits[i] and (i or len(digits) == 1 or d != "0")])
        wrong = int("".join(digits))
    if wrong < 0 or wrong == value:
        wrong = value + rng.randint(1, 9)
    out = step[: match.start(1)] + str(wrong) + step[match.end(1) :]
    return out.replace(f"\\boxed{{{value}}}", f"\\boxed{{{wrong}}}")


def train_pairs(num_pairs: int, seed: int, exclude_ids: set[str], exclude_questions: set[str]) -> list[Any]:
    """`num_pairs` wrong-result pairs from train-split problems that are not held out, one per problem."""
    from psr_ray.core.steps import join_steps
    from psr_ray.init_data.build import load_worked_problems
    from psr_ray.init_data.candidates import OraclePair
    from psr_ray.init_data.labelled import LabelledPair
    from psr_ray.oracle.exact import reference_values, why_wrong

    rng = random.Random(seed)
    pairs = []
    for problem in load_worked_problems("embedded:arith", split="train", seed=seed + 1):
        if len(pairs) == num_pairs:
            break
        if problem.problem_id in exclude_ids or problem.question.strip() in exclude_questions:
            continue
        index = rng.randrange(len(problem.steps))
        good = problem.steps[index]
        bad = wrong_result(good, rng)
        values = reference_values(problem)
        why = None if bad is None else why_wrong(problem, index, bad, values=values)
        if why is None or category(why) != "wrong result" or why_wrong(problem, index, good, values=values):
            continue
        pair = LabelledPair(problem.question, join_steps(problem.steps[:index]), good, bad)
        pairs.append(OraclePair(problem.problem_id, pair, 2, 1, why))
    if len(pairs) < num_pairs:
        raise ValueError(f"--rows: the train split gives only {len(pairs)} pairs, fewer than {num_pairs}")
    return pairs


# ---- stages, each in its own process ----------------------------------------------------------------------


def measure(model: str, pairs_json: str, modes: list[str], max_tokens: int, kv_cache_gib: int) -> dict[str, Any]:
    """Judgments of `model` on the pairs (both orders) in each mode, with wall times."""
    from psr_ray.engines.actor import EngineActor
    from psr_ray.engines.settings import EngineSettings
    from psr_ray.init_data.labelled import LabelledPair, judge_requests

    pairs = [LabelledPair(**p) for p in json.loads(Path(pairs_json).read_text())]
    requests, _ = judge_requests(pairs)
    started = time.perf_counter()
    settings = EngineSettings(model_path=model, role="judge", cpu_kv_cache_gib=kv_cache_gib, log_stats=False)
    engine = EngineActor(settings, name="bench-judge-cues")
    out: dict[str, Any] = {"engine_start_s": time.perf_counter() - started, "modes": {}}
    for mode in modes:
        started = time.perf_counter()
        judgments = asyncio.run(engine.judge(requests, mode=mode, temperature=0.0, max_tokens=max_tokens))
        out["modes"][mode] = {
            "wall_s": time.perf_counter() - started,
            "judgments": [
                {"verdict": j.verdict, "prob_a": j.prob_a, "text": j.text, "num_tokens": j.num_tokens}
                for j in judgments
            ],  # fmt: skip
        }
        print(f"measured {mode}: {out['modes'][mode]['wall_s']:.1f} s", flush=True)
    return out


def train(model: str, rows_json: str, out_dir: str, *, lr: float, epochs: int, batch: int, seed: int,
          max_steps: int | None, on_epoch: Callable[[int, Any, Any], None] | None = None) -> dict[str, Any]:  # fmt: skip
    """SFT of `model` on the rows (prompt_text, target_text); saves an HF folder to `out_dir`. `on_epoch(epoch,
    policy, tokenizer)` runs after each full epoch (bench/judge_phase.py measures there)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from psr_ray.config import LRSchedule
    from psr_ray.trainer.batches import collate_sft
    from psr_ray.trainer.deepspeed_zero import ADAMW_PARAMS, GRADIENT_CLIPPING
    from psr_ray.trainer.schedule import lr_multiplier

    torch.manual_seed(seed)
    torch.set_num_threads(os.cpu_count() or 1)
    rows = json.loads(Path(rows_json).read_text())
    tokenizer = AutoTokenizer.from_pretrained(model)
    policy = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    policy.train()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr, **ADAMW_PARAMS)
    order = [i for e in range(epochs) for i in random.Random(seed + e).sample(range(len(rows)), len(rows))]
    batches = [order[i : i + batch] for i in range(0, len(order), batch)][:max_steps]
    warmup = max(1, len(batches) // 10)
    history, started = [], time.perf_counter()
    for step, indices in enumerate(batches):
        step_started = time.perf_counter()
        encoded, _ = collate_sft(tokenizer, [rows[i] for i in indices], max_seq_len=2048)
        mask = encoded["loss_mask"][:, 1:].bool()
        hidden = policy.model(
            input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]
        ).last_hidden_state
        # The output head only on target positions: a 49k vocabulary over every prompt token is most of the cost.
        logits = policy.lm_head(hidden[:, :-1][mask])
        loss = torch.nn.functional.cross_entropy(logits.float(), encoded["input_ids"][:, 1:][mask])
        for group in optimizer.param_groups:
            group["lr"] = lr * lr_multiplier(step, schedule=LRSchedule.CONSTANT, warmup_steps=warmup)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), GRADIENT_CLIPPING)
        optimizer.step()
        history.append({"step": step, "loss": float(loss.detach()), "tokens": int(encoded["attention_mask"].sum()),
                        "step_s": time.perf_counter() - step_started})  # fmt: skip
        print(
            f"step {step + 1}/{len(batches)} loss {float(loss.detach()):.3f} {history[-1]['step_s']:.1f} s", flush=True
        )
        if on_epoch is not None and ((step + 1) * batch) % len(rows) < batch:
            policy.eval()
            on_epoch(((step + 1) * batch) // len(rows), policy, tokenizer)
            policy.train()
    wall_s = time.perf_counter() - started
    policy.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return {"history": history, "wall_s": wall_s, "steps": len(batches), "rows": len(rows), "lr": lr,
            "epochs": epochs, "batch": batch, "warmup_steps": warmup, "threads": torch.get_num_threads()}  # fmt: skip


def run_stage(args: argparse.Namespace, result: Path, stage_args: list[str]) -> dict[str, Any]:
    """A stage in a fresh interpreter (its engine or model frees its memory on exit); cached in `result`."""
    if result.is_file():
        print(f"reusing {result}", flush=True)
        return json.loads(result.read_text())
    command = [sys.executable, __file__, *stage_args, "--stage-out", str(result)]
    subprocess.run(command, check=True)
    return json.loads(result.read_text())


# ---- report -----------------------------------------------------------------------------------------------


def score_rows(name: str, mode: str, measured: dict[str, Any], pairs: list[Any]) -> list[dict[str, Any]]:
    from psr_ray.engines.api import Judgment
    from psr_ray.init_data.labelled import judge_requests, score_judgments

    _, labels = judge_requests([p.pair for p in pairs])
    judgments = [Judgment(j["verdict"], j["prob_a"], j["text"], j["num_tokens"], 0) for j in measured["judgments"]]
    out = []
    for cat in ("all", "wrong result", "other"):
        keep = [i for i, p in enumerate(pairs) if cat == "all" or category(p.why_bad) == cat]
        idx = [k for i in keep for k in (2 * i, 2 * i + 1)]
        scores = score_judgments([judgments[k] for k in idx], [labels[k] for k in idx]).to_dict()
        out.append({"model": name, "mode": mode, "category": cat, **scores, "wall_s": measured["wall_s"],
                    "tokens": sum(judgments[k].num_tokens for k in idx)})  # fmt: skip
    return out


def explain_diagnostics(texts: list[str], verdicts: list[str]) -> dict[str, Any]:
    """What an explain-mode judge did with the cue: the share of its recomputations that are right (the
    policy's skill), and of judgments whose two checks single out one step (written != recomputed), the
    share whose verdict picks the other step (the comparison step of the cue)."""
    from psr_ray.oracle.exact import recompute

    checks = right = decisive = follows = 0
    for text, verdict in zip(texts, verdicts, strict=True):
        found = {m.group(1): m for m in _CHECK.finditer(text)}
        for m in found.values():
            checks += 1
            redone = recompute(f"{m.group(2)} = {m.group(3)}")
            right += redone is not None and redone.split(", it writes ")[0].endswith(f"= {m.group(3)}")
        flagged = [letter for letter, m in found.items() if m.group(3) != m.group(4)]
        if len(found) == 2 and len(flagged) == 1:
            decisive += 1
            follows += verdict == ("B" if flagged[0] == "A" else "A")
    return {"with_checks": sum(bool(_CHECK.search(t)) for t in texts), "checks": checks, "checks_right": right,
            "decisive": decisive, "follows": follows}  # fmt: skip


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def report(args: argparse.Namespace, pairs: list[Any], rows: list[dict[str, Any]], fits: dict[str, Any],
           measured: dict[str, Any], overlap: int, num_train_pairs: int) -> str:  # fmt: skip
    counts = {c: sum(category(p.why_bad) == c for p in pairs) for c in ("wrong result", "other")}
    lines = [
        "# Judge cues: recompute-then-compare (issue 13 section 4b)",
        "",
        f"Written by `bench/judge_cues.py` ({' '.join(sys.argv[1:]) or 'defaults'}). Model M1 = "
        f"`{args.model}`. Held-out pairs: {len(pairs)} (the init's heldout_pairs.parquet: M1's own candidates, "
        f"oracle-labelled; {counts['wrong result']} wrong result, {counts['other']} other), each judged in both "
        f"orders, greedy, explain mode up to {args.explain_tokens} tokens. Machine: {platform.machine()}, "
        f"{os.cpu_count()} cores (shared: wall times indicative).",
        "",
        f"Training rows: {num_train_pairs} wrong-result pairs x 2 orders from the arith train split, "
        f"{overlap} of their questions among the held-out ones (by text; held-out ids excluded too). "
        "Plain single-process torch loop, fp32, AdamW (betas 0.9/0.95, wd 0), clip 1.0, mean cross-entropy on "
        "target tokens, linear warm-up then constant lr.",
        "",
        "accuracy: right verdicts / judgments (unparseable = wrong); pair accuracy: both orders' mean P(good) > "
        "0.5 (the search's rule); share A: parsed verdicts saying A. Chance is 50%. Brackets: 95% Wilson.",
        "",
        "| model | targets | K rows | lr | epochs | optimizer steps | loss first -> last (mean of last 4) | "
        "train wall s | s/step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, fit in fits.items():
        losses = [h["loss"] for h in fit["history"]]
        tail = losses[-4:]
        lines.append(
            f"| M1+{arm} | {arm} | {fit['rows']} | {fit['lr']:g} | {fit['epochs']} | {fit['steps']} | "
            f"{losses[0]:.3f} -> {sum(tail) / len(tail):.3f} | {fit['wall_s']:.0f} | "
            f"{fit['wall_s'] / max(1, fit['steps']):.1f} |"
        )
    lines += [
        "",
        "| model | judge mode | category | judgments | accuracy % [95% CI] | parse % | pair accuracy % [95% CI] | "
        "share A % | generated tokens | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for name, by_mode in measured.items():
        for mode, result in by_mode["modes"].items():
            for r in score_rows(name, mode, result, pairs):
                if r["num_judgments"] == 0:
                    continue
                lo, hi = r["accuracy_ci95"]
                plo, phi = r["pair_accuracy_ci95"]
                lines.append(
                    f"| {name} | {mode} | {r['category']} | {r['num_judgments']} | {_pct(r['accuracy'])} "
                    f"[{_pct(lo)}, {_pct(hi)}] | {_pct(r['parse_rate'])} | {_pct(r['pair_accuracy'])} "
                    f"[{_pct(plo)}, {_pct(phi)}] | {_pct(r['share_a'])} | {r['tokens']} | {r['wall_s']:.0f} |"
                )
                if r["category"] == "all":
                    beat = "beats chance" if lo > 0.5 else ("is below chance" if hi < 0.5 else "is not beyond chance")
                    verdicts.append(f"- {name}, {mode} mode: accuracy {_pct(r['accuracy'])}% [{_pct(lo)}, "
                                    f"{_pct(hi)}] {beat} (95% CI {'excludes' if lo > 0.5 or hi < 0.5 else 'includes'} 50%).")  # fmt: skip
    lines += ["", "Verdicts (computed from the intervals above):", "", *verdicts, "",
              "Explain mode, what the judge wrote: judgments holding a recomputation (`Step A: a op b = r, it "
              "writes c`); recomputations whose r is right; judgments whose two recomputations flag exactly one "
              "step (r != c), and how many of those verdicts pick the other step (the compare half of the cue).",
              "", "| model | judgments | with recomputation | recomputations right | one step flagged | "
              "verdict follows the flag |", "|---|---|---|---|---|---|"]  # fmt: skip
    for name, by_mode in measured.items():
        if "explain" in by_mode["modes"]:
            js = by_mode["modes"]["explain"]["judgments"]
            d = explain_diagnostics([j["text"] for j in js], [j["verdict"] for j in js])
            lines.append(
                f"| {name} | {len(js)} | {d['with_checks']} | {d['checks_right']}/{d['checks']} | "
                f"{d['decisive']} | {d['follows']}/{d['decisive']} |"
            )
    lines += ["", "First judgments:", ""]
    for name, by_mode in measured.items():
        for mode, result in by_mode["modes"].items():
            for j in result["judgments"][:2]:
                flat = " ".join(j["text"].split()).replace("`", "'")
                lines.append(f"- {name}, {mode}: `{flat[:300]}`")
    lines += ["", "Training row example (explain target):", "", f"`{' '.join(rows[0]['target_text'].split())}`"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init-dir", default=DEFAULT_INIT)
    parser.add_argument("--model", default=None, help="default: the init's hf_dir (M1)")
    parser.add_argument("--rows", type=int, default=256, help="K: training rows (pairs x 2 orders)")
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arms", default="explain", help="targets to fine-tune on, in order: explain[,direct]")
    parser.add_argument("--explain-tokens", type=int, default=128)
    parser.add_argument("--kv-cache-gib", type=int, default=4)
    parser.add_argument("--max-pairs", type=int, default=None, help="held-out pairs to use (smoke runs)")
    parser.add_argument("--max-steps", type=int, default=None, help="stop each fit after this many steps")
    parser.add_argument("--work", default="/tmp/judge_cues")
    parser.add_argument("--out", default=str(HERE / "results" / "judge_cues.md"))
    parser.add_argument("--stage", choices=["measure", "train"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--stage-model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--stage-in", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--stage-modes", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--stage-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--stage-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.stage == "measure":
        out = measure(args.stage_model, args.stage_in, args.stage_modes.split(","), args.explain_tokens,
                      args.kv_cache_gib)  # fmt: skip
        Path(args.stage_out).write_text(json.dumps(out))
        return
    if args.stage == "train":
        out = train(args.stage_model, args.stage_in, args.stage_dir, lr=args.lr, epochs=args.epochs,
                    batch=args.batch, seed=args.seed, max_steps=args.max_steps)  # fmt: skip
        Path(args.stage_out).write_text(json.dumps(out))
        return

    from psr_ray.config import JudgeMode
    from psr_ray.init_data.build import eft_rows

    init_dir = Path(args.init_dir).expanduser()
    for name in ("init.json", "heldout_pairs.parquet"):
        if not (init_dir / name).is_file():
            sys.exit(f"--init-dir: {init_dir / name} not found (run `psr-ray init` first)")
    pairs, info = heldout(init_dir)
    pairs = pairs[: args.max_pairs]
    args.model = args.model or info["hf_dir"]
    arms = [JudgeMode(a) for a in args.arms.split(",") if a]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    pairs_json = work / "heldout.json"
    pairs_json.write_text(json.dumps([p.pair._asdict() for p in pairs]))

    heldout_questions = {p.pair.question.strip() for p in pairs}
    train_set = train_pairs(args.rows // 2, args.seed, set(info["heldout_problem_ids"]), heldout_questions)
    overlap = sum(p.pair.question.strip() in heldout_questions for p in train_set)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    key = f"k{args.rows}_lr{args.lr:g}_e{args.epochs}_b{args.batch}_s{args.seed}_n{len(pairs)}_m{args.max_steps}"
    example = eft_rows(tokenizer, train_set[:1], mode=JudgeMode.EXPLAIN)
    measured: dict[str, Any] = {}
    fits: dict[str, Any] = {}

    def write_report() -> None:
        # After every stage: a run cut short still leaves the figures it measured (the rest stay cached).
        text = report(args, pairs, example, fits, measured, overlap, len(train_set))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(text, flush=True)
        print(f"wrote {args.out}", flush=True)

    # The cue first (train, then measure), M1's baseline after it: the new figure is the trained judge's.
    for arm in arms:
        rows = eft_rows(tokenizer, train_set, mode=arm)
        rows_json = work / f"rows_{arm.value}_{key}.json"
        rows_json.write_text(json.dumps([{k: r[k] for k in ("prompt_text", "target_text")} for r in rows]))
        model_dir = work / f"model_{arm.value}_{key}"
        fits[arm.value] = run_stage(args, work / f"fit_{arm.value}_{key}.json",
                                    ["--stage", "train", "--stage-model", args.model, "--stage-in", str(rows_json),
                                     "--stage-dir", str(model_dir), "--lr", str(args.lr), "--epochs",
                                     str(args.epochs), "--batch", str(args.batch), "--seed", str(args.seed),
                                     *(["--max-steps", str(args.max_steps)] if args.max_steps else [])])  # fmt: skip
        measured[f"M1+{arm.value}"] = run_stage(
            args, work / f"measure_{arm.value}_{key}_t{args.explain_tokens}.json",
            ["--stage", "measure", "--stage-model", str(model_dir), "--stage-in", str(pairs_json),
             "--stage-modes", "explain,direct", "--explain-tokens", str(args.explain_tokens),
             "--kv-cache-gib", str(args.kv_cache_gib)],
        )  # fmt: skip
        write_report()
    measured = {"M1": run_stage(args, work / f"measure_M1_n{len(pairs)}_t{args.explain_tokens}.json",
                                ["--stage", "measure", "--stage-model", args.model, "--stage-in", str(pairs_json),
                                 "--stage-modes", "direct,explain", "--explain-tokens", str(args.explain_tokens),
                                 "--kv-cache-gib", str(args.kv_cache_gib)]), **measured}  # fmt: skip
    write_report()


if __name__ == "__main__":
    main()
