"""How far a short step-DPO fit moves SmolLM2-135M at the embedded config's trainer settings, per learning rate.

Labelled GSM8K step pairs (the reference step chosen, the same step with one number changed rejected), the
embedded preset's trainer (2 workers, ZeRO-3, fp32, its batch sizes and schedule), one fit per learning rate
from the same model. Reported: optimizer steps, the largest weight change against the base model, and the
held-out figures the trainer computes on pairs it never trained on (exact per-token KL to the reference,
DPO reward margin and accuracy). Writes bench/results/embedded_lr.md after every fit (about 4 minutes a
learning rate on 2 shared cores).

    flock /tmp/psr_heavy.lock .venv/bin/python bench/embedded_lr.py --lrs 1e-6,1e-5,5e-5
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def pair_rows(num_pairs: int, seed: int) -> list[dict]:
    from psr_ray.core.steps import split_steps
    from psr_ray.data.problems import read_source
    from psr_ray.init_data.labelled import build_corrupted_pairs

    rows = [row for _, _, row in read_source("embedded:gsm8k", "train").rows]
    pairs = build_corrupted_pairs(rows, num_pairs, seed)
    return [
        {"question": p.question, "prefix": p.prefix, "step_index": len(split_steps(p.prefix)) + 1,
         "chosen": p.good_step, "rejected": p.bad_step}
        for p in pairs
    ]  # fmt: skip


def max_weight_change(base_dir: str, trained_dir: str) -> float:
    from safetensors.torch import load_file

    def weights(folder: str) -> dict:
        out: dict = {}
        for file in sorted(Path(folder).glob("*.safetensors")):
            out |= load_file(str(file))
        return out

    base, trained = weights(base_dir), weights(trained_dir)
    return max((trained[k].float() - base[k].float()).abs().max().item() for k in trained)


def write_table(args: argparse.Namespace, base_cfg: Any, results: list) -> None:
    """The results table so far: written after every fit, so a run cut short keeps what it measured."""
    tcfg = base_cfg.trainer
    lines = [
        "# How far a short step-DPO fit moves SmolLM2-135M (embedded trainer settings)",
        "",
        f"Command: `{' '.join(['bench/embedded_lr.py', *sys.argv[1:]])}`. Model `{base_cfg.model.path}` (fp32). "
        f"{args.train_pairs} training and {args.heldout_pairs} held-out labelled GSM8K step pairs (seed "
        f"{args.seed}; chosen = the reference step, rejected = the same step with one number changed). Trainer as "
        f"in psr_ray/configs/embedded_cpu.yaml: {tcfg.num_workers} workers, ZeRO-{tcfg.zero_stage}, beta {tcfg.beta}, "
        f"global batch {tcfg.global_batch_size}, micro batch {tcfg.micro_batch_size}, {tcfg.num_epochs} epoch, "
        f"schedule {tcfg.lr_schedule} (warm-up {tcfg.warmup_steps} steps); only the learning rate varies. "
        f"Machine: {platform.machine()}, {os.cpu_count()} cores (shared).",
        "",
        "max |dw|: the largest change of any weight of the HF export against the base model. Held-out (pairs "
        "never trained on, policy vs its frozen reference = the base model): mean exact full-vocabulary "
        "KL(policy || reference) per step token, mean DPO reward margin r_w - r_l, share of pairs with margin > 0.",
        "",
        "| learning rate | optimizer steps | pairs trained | max abs dw | held-out KL/token | held-out reward margin | "
        "held-out reward accuracy | fit s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for lr, result, change, seconds in results:
        h = result.heldout
        lines.append(
            f"| {lr:g} | {result.num_optimizer_steps} | {result.num_trained_rows} | {change:.3g} | "
            f"{h['heldout/kl_per_token']:.3g} | {h['heldout/reward_margin']:.4f} | "
            f"{h['heldout/reward_accuracy']:.1%} | {seconds:.0f} |"
        )
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lrs", default="1e-6,1e-5,5e-5", help="comma-separated learning rates")
    parser.add_argument("--train-pairs", type=int, default=24)
    parser.add_argument("--heldout-pairs", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(HERE / "results" / "embedded_lr.md"))
    args = parser.parse_args()

    import ray

    from psr_ray import config as C
    from psr_ray.pipeline import preflight
    from psr_ray.runtime.cluster import init_ray
    from psr_ray.runtime.models import resolve_model_path
    from psr_ray.trainer.group import train_dpo

    rows = pair_rows(args.train_pairs + args.heldout_pairs, args.seed)
    train, heldout = rows[: args.train_pairs], rows[args.train_pairs :]
    results = []
    with tempfile.TemporaryDirectory(prefix="psr_embedded_lr_") as tmp:
        base_cfg = C.load([C.DEFAULT_CONFIG], [f"run.output_dir={tmp}", "run.wandb_mode=disabled"])
        base = resolve_model_path(base_cfg.model.path, base_cfg.run.cache_dir)
        init_ray(base_cfg)
        for lr in [float(x) for x in args.lrs.split(",")]:
            cfg = preflight.validate(
                C.load([C.DEFAULT_CONFIG], [f"run.output_dir={tmp}", f"trainer.learning_rate={lr}"])
            )
            started = time.perf_counter()
            result = train_dpo(
                cfg, policy_path=base, reference_path=base, dataset=ray.data.from_items(train),
                output_dir=f"{tmp}/lr_{lr:g}", policy_version=2, heldout=heldout,
            )  # fmt: skip
            seconds = time.perf_counter() - started
            results.append((lr, result, max_weight_change(base, result.hf_dir), seconds))
            write_table(args, base_cfg, results)
            h = result.heldout
            print(f"lr {lr:g}: {result.num_optimizer_steps} steps, max |dw| {results[-1][2]:.3g}, "
                  f"KL/token {h['heldout/kl_per_token']:.3g}, margin {h['heldout/reward_margin']:.4f}, "
                  f"accuracy {h['heldout/reward_accuracy']:.3f}, {seconds:.0f} s", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
