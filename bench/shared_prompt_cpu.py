"""A pair's shared prompt computed once against two separate rows (issue 25 item 5), by CPU time: the DPO
micro-step (reference forward, policy forward + backward) of the trainer's code on the bench's step pairs, in
this process on one torch thread, timed with `time.process_time`. CPU seconds barely move with other jobs'
load, where wall-clock tokens/s on a shared machine do (bench/trainer_cpu.py measures the whole trainer by wall
time). Arms alternate per micro-batch (shared, separate, shared, ...) on the same pairs and weights, after one
untimed micro-step of each.
Writes bench/results/shared_prompt_cpu.md.

    .venv/bin/python bench/shared_prompt_cpu.py                  # SmolLM2-135M, 8 pairs: about 3 CPU minutes
    .venv/bin/python bench/shared_prompt_cpu.py --tiny --out /tmp/s.md
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from trainer_cpu import pair_rows  # noqa: E402  (the same step pairs as the trainer bench)


def micro_step_cpu(policy: Any, reference: Any, batch: dict[str, Any]) -> float:
    """CPU seconds of one DPO micro-step on `batch` (either layout)."""
    import torch

    from psr_ray.trainer.forward import forward_logps
    from psr_ray.trainer.loss import step_dpo_loss

    started = time.process_time()
    with torch.no_grad():
        ref = forward_logps(reference, batch)
    logps = forward_logps(policy, batch)
    b = logps.shape[0] // 2
    step_dpo_loss(logps[:b], logps[b:], ref[:b], ref[b:], beta=0.5).loss.backward()
    seconds = time.process_time() - started
    policy.zero_grad(set_to_none=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--micro", type=int, default=2, help="pairs per micro-batch (the embedded preset's)")
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(HERE / "results" / "shared_prompt_cpu.md"))
    parser.add_argument("--tiny", action="store_true", help="the tiny test model instead (proves the script runs)")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from psr_ray import config as C
    from psr_ray.runtime.models import resolve_model_path
    from psr_ray.trainer.batches import collate_pairs, collate_shared_pairs, sequence_tokens

    torch.set_num_threads(1)
    rows = pair_rows(args.pairs, args.seed)
    with tempfile.TemporaryDirectory(prefix="psr_shared_prompt_") as tmp:
        if args.tiny:
            from psr_ray.testing import build_tiny_model

            model_name = model = build_tiny_model(f"{tmp}/tiny_model")
        else:
            cfg = C.load([C.DEFAULT_CONFIG], [f"run.output_dir={tmp}"])
            model_name, model = cfg.model.path, resolve_model_path(cfg.model.path, cfg.run.cache_dir)
        tokenizer = AutoTokenizer.from_pretrained(model)
        policy = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, attn_implementation="sdpa")
        reference = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, attn_implementation="sdpa")
    policy.train()
    reference.eval().requires_grad_(False)
    arms = {"shared": collate_shared_pairs, "separate": collate_pairs}
    cpu = dict.fromkeys(arms, 0.0)
    computed = dict.fromkeys(arms, 0)
    sequences = 0
    for collate in arms.values():  # untimed: the first call of each shape pays one-off allocations
        micro_step_cpu(policy, reference, collate(tokenizer, rows[: args.micro], max_seq_len=args.max_seq_len)[0])
    for i in range(0, len(rows), args.micro):
        micro = rows[i : i + args.micro]
        for arm, collate in arms.items():
            batch, _ = collate(tokenizer, micro, max_seq_len=args.max_seq_len)
            cpu[arm] += micro_step_cpu(policy, reference, batch)
            computed[arm] += int(batch["attention_mask"].sum())
        sequences += int(sequence_tokens(batch))
        print(f"micro-batch {i // args.micro + 1}: {cpu}", flush=True)
    gain = cpu["separate"] / cpu["shared"]
    out = [
        "# Shared prompt against separate rows, by CPU time (bench/shared_prompt_cpu.py)",
        "",
        f"Command: `{' '.join(['bench/shared_prompt_cpu.py', *sys.argv[1:]])}`. {os.cpu_count()} cores, shared with "
        f"other jobs (1-minute load average at the end: {os.getloadavg()[0]:.1f}); one torch thread. Model "
        f"`{model_name}` (float32, sdpa); {len(rows)} arithmetic step pairs (seed {args.seed}) in micro-batches "
        f"of {args.micro}, max_seq_len {args.max_seq_len}; the DPO micro-step of the trainer's code (reference "
        "forward, policy forward + backward) timed by `time.process_time`.",
        "",
        "| arm | tokens of the sequences | tokens computed | CPU s | CPU s per pair | sequence tokens per CPU s |",
        "|---|---|---|---|---|---|",
    ]
    for arm in arms:
        out.append(f"| {arm} | {sequences} | {computed[arm]} | {cpu[arm]:.1f} | {cpu[arm] / len(rows):.2f} | "
                   f"{sequences / cpu[arm]:.1f} |")  # fmt: skip
    out += [
        "",
        f"Shared-prompt gain: **{gain:.2f}x** less CPU per pair; the packed rows compute "
        f"{computed['shared'] / computed['separate']:.0%} of the tokens (at most "
        f"{computed['separate'] / computed['shared']:.2f}x if the cost went by tokens).",
    ]
    Path(args.out).write_text("\n".join(out) + "\n")
    print("\n".join(out))


if __name__ == "__main__":
    main()
