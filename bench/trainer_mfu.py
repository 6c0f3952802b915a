"""Step-DPO throughput and MFU of the trainer's ZeRO-3 engines (the same code the Ray Train workers run).

One process, world size 1, no Ray: a random-init Qwen2-shaped model (default: Qwen2.5-1.5B's shape, 1.54B
parameters), bf16, ZeRO-3, SDPA, gradient checkpointing, policy + frozen reference engine, one DPO step =
reference forward + policy forward/backward + optimizer step on `--pairs` pairs x `--seq-len` tokens
(chosen and rejected rows together: 8 pairs = 16 x 1024 tokens).

    python bench/trainer_mfu.py                # GPU
    python bench/trainer_mfu.py --tiny         # CPU smoke run with a tiny config (fp32, gloo)

FLOPs counted per token: 8N = 6N (policy forward + backward) + 2N (reference forward), N = all parameters
(tied embeddings counted once; the usual approximation, which also counts the embedding lookup as a matmul);
attention's O(T^2) term and the forward recomputed by gradient checkpointing (another 2N) are not counted
as useful work. MFU = tokens/s x 8N / peak bf16 dense FLOP/s of the device (H100/H200 SXM: 989 TFLOP/s).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
RESULTS = Path(__file__).resolve().parent / "results" / "trainer_mfu.md"

QWEN2_1_5B = {
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
}
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 1024,
    "tie_word_embeddings": True,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny config on CPU (fp32, gloo): proves the script runs")
    parser.add_argument("--pairs", type=int, default=8, help="pairs per step (rows = 2 x pairs)")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=8, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    if args.tiny and args.seq_len == 1024:
        args.seq_len, args.pairs, args.steps = 128, 4, 4

    import torch

    use_gpu = torch.cuda.is_available() and not args.tiny
    if not use_gpu and not args.tiny:
        sys.exit("no CUDA device: run with --tiny on CPU")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29531"))
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from psr_ray.config import TrainerConfig
    from psr_ray.trainer.deepspeed_zero import build_policy, build_reference, prepare_deepspeed
    from psr_ray.trainer.worker import dpo_micro_step

    prepare_deepspeed(use_gpu)
    shape = TINY if args.tiny else QWEN2_1_5B
    config = Qwen2Config(
        **shape, max_position_embeddings=max(4096, args.seq_len), torch_dtype="bfloat16" if use_gpu else "float32"
    )
    tcfg = TrainerConfig(
        num_workers=1,
        use_gpu=use_gpu,
        micro_batch_size=args.pairs,
        global_batch_size=args.pairs,
        learning_rate=1e-6,
        gradient_checkpointing=not args.no_checkpointing,
        max_seq_len=args.seq_len,
    )
    with tempfile.TemporaryDirectory() as model_dir:
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config).to(torch.bfloat16 if use_gpu else torch.float32)
        num_params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(model_dir)
        del model
        t0 = time.perf_counter()
        policy = build_policy(model_dir, tcfg, use_gpu=use_gpu, world_size=1, learning_rate=1e-6)
        reference = build_reference(model_dir, tcfg, use_gpu=use_gpu, world_size=1)
        setup_s = time.perf_counter() - t0

    rows, length = 2 * args.pairs, args.seq_len
    gen = torch.Generator().manual_seed(1)
    batch = {
        "input_ids": torch.randint(0, shape["vocab_size"], (rows, length), generator=gen),
        "attention_mask": torch.ones(rows, length, dtype=torch.long),
        "loss_mask": torch.zeros(rows, length, dtype=torch.long),
    }
    batch["loss_mask"][:, length // 2 :] = 1  # the step is the second half, as a long prompt + step would be
    batch = {k: v.to(policy.device) for k, v in batch.items()}

    def sync() -> None:
        if use_gpu:
            torch.cuda.synchronize()

    times = []
    for i in range(args.warmup + args.steps):
        sync()
        start = time.perf_counter()
        dpo_micro_step(policy, reference, batch, beta=0.5, loss_scale=1.0)
        policy.step()
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    tokens_per_s = rows * length / step_s
    flops = tokens_per_s * 8 * num_params
    device = torch.cuda.get_device_name() if use_gpu else f"CPU ({os.cpu_count()} cores visible)"
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in device), None)
    result = {
        "device": device,
        "dtype": "bf16" if use_gpu else "fp32",
        "params": num_params,
        "shape": "tiny" if args.tiny else "Qwen2.5-1.5B",
        "tokens_per_step": rows * length,
        "batch": f"{rows} x {length}",
        "gradient_checkpointing": tcfg.gradient_checkpointing,
        "setup_s": round(setup_s, 2),
        "step_s": round(step_s, 4),
        "tokens_per_s": round(tokens_per_s, 1),
        "tflops": round(flops / 1e12, 4),
        "mfu": round(flops / peak, 4) if peak else None,
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if use_gpu else None,
    }
    print(json.dumps(result))
    write_results(Path(args.out), result)


def write_results(path: Path, r: dict) -> None:
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a (no bf16 peak for this device)"
    row = (
        f"| {r['device']} | {r['shape']} ({r['params'] / 1e6:.2f}M) | {r['dtype']} | {r['batch']} | "
        f"{r['gradient_checkpointing']} | {r['step_s']} | {r['tokens_per_s']} | {r['tflops']} | {mfu} |"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "# Trainer step-DPO throughput (bench/trainer_mfu.py)\n\n"
        "One process, ZeRO-3, SDPA, policy + frozen reference engine; one step = reference forward + policy "
        "forward/backward + AdamW step. FLOPs per token = 8N (6N policy fwd+bwd, 2N reference fwd; attention's "
        "T^2 term and the checkpointing recompute not counted). MFU = tokens/s x 8N / 989 TFLOP/s (H100/H200 "
        "bf16 dense).\n\n"
        "| device | model | dtype | batch (rows x tokens) | grad ckpt | step s (median) | tokens/s | TFLOP/s | MFU |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
        f"{row}\n\n" + ("## Notes\n\n" + (GPU_NOTE if r["mfu"] is not None else CPU_NOTE) + NOTES)
    )


CPU_NOTE = """- The run in the table was on CPU with `--tiny` (no GPU was lent when it was written): it proves the script
  runs end to end and says nothing about GPU efficiency. There is no GPU figure from this script yet.
"""
GPU_NOTE = "- The run in the table was measured by this script on the GPU named there.\n"
NOTES = """- Earlier measurement (../shared/FACTS.md, 2026-11-22, one H100, not re-run by this script): a
  Qwen2.5-1.5B-shaped config (1.54B params, random init, SDPA, gradient checkpointing, bf16, ZeRO-3, DPO
  step = policy fwd+bwd + reference fwd on 16 x 1024 tokens): 1.05 s a step, 15.5k tokens/s, about
  192 TFLOP/s counting 8N per token, about 19% MFU. Without checkpointing the batch ran out of memory
  (152k-vocab logits).
- To reproduce on a GPU: `python bench/trainer_mfu.py` (needs deepspeed, transformers, torch with CUDA).
"""


if __name__ == "__main__":
    main()
