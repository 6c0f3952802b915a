"""The CPU trainer against a plain single-process torch loop (issue 17 section 4), and the trainer's shared
prompt against two separate rows per pair (issue 25 item 5): same model, same pairs, one run.

Arms, run in alternation (a, b, c, d, e, a, b, ...) in one invocation, each a full fit on the same step pairs:
  (a) trainer: the product's `train_dpo` (Ray Train, DeepSpeed ZeRO-3, gloo, fp32) with the
      embedded preset's trainer settings (one worker on two CPUs) (psr_ray/configs/embedded_cpu.yaml), reading the pairs through the
      loop's streamed pairs dataset (Parquet parts + manifest, `stream_pairs_dataset`); a pair's chosen and
      rejected step packed in one row, their prompt computed once (`trainer.share_prompt`, the default);
  (b) separate: the same with `trainer.share_prompt=false` (chosen and rejected as two rows, as before);
  (c) two_workers: the trainer as the preset had it before: two workers of one CPU (one torch thread) each;
  (e) bf16_autocast: the same as trainer with `trainer.cpu_bf16_autocast=true` (bf16 matmuls on fp32
      weights, gradients and optimizer state);
  (d) plain: one process, `torch.set_num_threads(os.cpu_count())`, the same HF model loaded twice (policy and
      frozen reference), the same tokenization (`collate_pairs`), step-DPO loss, micro and global batch,
      AdamW settings and gradient clipping: the loop a user would write.
Pairs: SmolLM2-135M-Instruct (fp32) on step pairs of the built-in arithmetic task (the reference step chosen,
the same step with one number changed rejected; seeded).

Figures per fit (psr_ray/trainer/fit_timing.py): steady tokens/s over the optimizer steps after the first,
from the trainer's own per-step metrics (`train/num_tokens`, `train/step_s`); start-up = call -> end of the
first optimizer step minus that step's work at the steady rate; teardown = last step -> return. Tokens are
real (unpadded) tokens of the chosen and rejected sequences, in every arm (a packed row's shared prompt
counts for both of its sequences, though computed once); each passes through the reference forward and the
policy forward + backward, so policy + reference tokens/s is twice the sequence figure. The goals: a
trainer/plain ratio of steady tokens/s >= 0.8, and the shared-prompt gain trainer/separate as a ratio
(medians over the repeats). Writes bench/results/trainer_cpu.md.

    flock /tmp/psr_heavy.lock .venv/bin/python bench/trainer_cpu.py            # about 18 min on 2 cores
    .venv/bin/python bench/trainer_cpu.py --tiny --repeats 1 --out /tmp/t.md    # smoke run: the tiny test model
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
GOAL = 0.8
ARMS = ("trainer", "separate", "two_workers", "plain", "bf16_autocast")


def pair_rows(num_pairs: int, seed: int) -> list[dict[str, Any]]:
    """Step pairs of arithmetic training problems: a random step chosen, that step with one number moved
    rejected, the steps before it as the prefix."""
    from psr_ray.core.steps import split_steps
    from psr_ray.data.arith import split_rows
    from psr_ray.init_data.labelled import build_corrupted_pairs

    # build_corrupted_pairs reads GSM8K-shaped answers: the steps as lines, then `#### answer`.
    rows = [{"question": r["question"], "answer": "\n".join(r["steps"]) + f"\n#### {r['answer']}"}
            for r in split_rows("embedded:arith", "train")]  # fmt: skip
    pairs = build_corrupted_pairs(rows, num_pairs, seed)
    if len(pairs) < num_pairs:
        raise ValueError(f"--pairs {num_pairs}: the arithmetic train split gives only {len(pairs)}")
    return [
        {"question": p.question, "prefix": p.prefix, "step_index": len(split_steps(p.prefix)) + 1,
         "chosen": p.good_step, "rejected": p.bad_step}
        for p in pairs
    ]  # fmt: skip


def write_pairs(run_dir: str, rows: list[dict[str, Any]]) -> None:
    """The pairs as iteration 1 of a run folder, as the search writes them (one problem per pair)."""
    from psr_ray.data.pairs_io import PairWriter
    from psr_ray.testing import make_pair

    writer = PairWriter(run_dir, 1, flush_pairs=8)
    for i, row in enumerate(rows):
        writer.add(f"p{i}", [make_pair(f"p{i}", iteration=1, **row)])
    writer.close()


class _WorkerThreads:
    """Returned by `WorkerThreadsSender.send` (the weight push is the one call that runs on every worker):
    rank 0's report lands in the checkpoint's metadata, which is how the bench learns what each worker's torch
    ran with."""

    def __init__(self, value: dict[str, Any]):
        self.value = value

    def to_dict(self) -> dict[str, Any]:
        return self.value


class WorkerThreadsSender:
    """A weight sender that sends nothing and reports the worker's torch threads instead."""

    backend = "none"

    def send(self, state_dict: Any, *, policy_version: int) -> _WorkerThreads:
        import torch

        env = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
        return _WorkerThreads({"torch_threads": torch.get_num_threads(),
                               "interop_threads": torch.get_num_interop_threads(),
                               "affinity": len(os.sched_getaffinity(0)), **env})  # fmt: skip


def trainer_fit(cfg: Any, model: str, run_dir: str, out_dir: str) -> dict[str, Any]:
    """Arm (a): one `train_dpo` on the streamed pairs of `run_dir`'s iteration 1."""
    from psr_ray.data.pairs_io import stream_pairs_dataset
    from psr_ray.trainer import checkpoint as ckpt
    from psr_ray.trainer.fit_timing import fit_timing
    from psr_ray.trainer.group import train_dpo

    dataset = stream_pairs_dataset(run_dir, 1)
    called = time.time()
    result = train_dpo(cfg, policy_path=model, reference_path=model, dataset=dataset, output_dir=out_dir,
                       policy_version=2, weight_sender=WorkerThreadsSender())  # fmt: skip
    returned = time.time()
    timing = fit_timing(result.metrics, called_at=called, returned_at=returned)
    info = ckpt.read_version(result.checkpoint_dir)
    phases = info.get("phases", {})
    first = result.metrics[0]
    engines = sum(phases.get(k, 0.0) for k in ("init_distributed", "policy_engine", "reference_engine"))
    breakdown = {
        # call -> the worker loop's first line: the Ray Train controller, worker actors, their imports
        "group_s": first["train/step_end_unix_s"] - first["train/step_s"] - called - engines,
        "engines_s": engines,  # deepspeed init_distributed + policy (tokenizer, load, ZeRO-3 init) + reference
        "first_step_extra_s": first["train/step_s"] - first["train/num_tokens"] / timing.steady_tokens_per_s,
    }
    return {"timing": timing, "breakdown": breakdown, "threads": info.get("weight_sync") or {},
            "pairs": result.num_trained_rows, "history": result.metrics}  # fmt: skip


def plain_fit(cfg: Any, model: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Arm (b): the single-process loop, emitting the same per-step metrics as the trainer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from psr_ray.trainer.batches import collate_pairs
    from psr_ray.trainer.deepspeed_zero import ADAMW_PARAMS, GRADIENT_CLIPPING
    from psr_ray.trainer.fit_timing import fit_timing
    from psr_ray.trainer.loss import sequence_logps, step_dpo_loss

    tcfg = cfg.trainer
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(cfg.run.seed)
    called = time.time()
    tokenizer = AutoTokenizer.from_pretrained(model)
    policy = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, attn_implementation="sdpa")
    reference = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, attn_implementation="sdpa")
    policy.train()
    reference.eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=tcfg.learning_rate, **ADAMW_PARAMS)

    def logps(model_: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = model_(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        return sequence_logps(out.logits, batch["input_ids"], batch["loss_mask"])

    history: list[dict[str, float]] = []
    for start in range(0, len(rows), tcfg.global_batch_size):
        started = time.perf_counter()
        window = rows[start : start + tcfg.global_batch_size]
        tokens = 0
        for i in range(0, len(window), tcfg.micro_batch_size):
            micro = window[i : i + tcfg.micro_batch_size]
            batch, _ = collate_pairs(tokenizer, micro, max_seq_len=tcfg.max_seq_len)
            b = len(micro)
            with torch.no_grad():
                ref = logps(reference, batch)
            pol = logps(policy, batch)
            out = step_dpo_loss(pol[:b], pol[b:], ref[:b], ref[b:], beta=tcfg.beta)
            (out.loss * b / len(window)).backward()  # the mean over the window's pairs
            tokens += int(batch["attention_mask"].sum())
        torch.nn.utils.clip_grad_norm_(policy.parameters(), GRADIENT_CLIPPING)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        history.append({"train/num_tokens": float(tokens), "train/step_s": time.perf_counter() - started,
                        "train/step_end_unix_s": time.time()})  # fmt: skip
    returned = time.time()
    return {"timing": fit_timing(history, called_at=called, returned_at=returned), "pairs": len(rows),
            "threads": {"torch_threads": torch.get_num_threads()}, "history": history}  # fmt: skip


def computed_share(tokenizer: Any, rows: list[dict[str, Any]], *, max_seq_len: int, micro: int) -> float:
    """Tokens the packed rows compute over the tokens of the sequences (the micro-batches of a fit)."""
    from psr_ray.trainer.batches import collate_shared_pairs, sequence_tokens

    computed = sequences = 0
    for i in range(0, len(rows), micro):
        batch, _ = collate_shared_pairs(tokenizer, rows[i : i + micro], max_seq_len=max_seq_len)
        computed += int(batch["attention_mask"].sum())
        sequences += int(sequence_tokens(batch))
    return computed / sequences


def summarize(fits: dict[str, list[dict[str, Any]]]) -> dict[str, float]:
    """Medians over the repeats of the arms that ran; against the trainer: plain's ratio (the goal), the
    shared-prompt gain (over separate), one worker's gain (over two_workers) and bf16 autocast's gain."""
    med = {arm: {key: statistics.median(getattr(f["timing"], key) for f in runs)
                 for key in ("steady_tokens_per_s", "startup_s", "teardown_s")}
           for arm, runs in fits.items() if runs}  # fmt: skip
    out = {f"{arm}_{k}": v for arm, m in med.items() for k, v in m.items()}
    if "trainer" not in med:
        return out
    rate = {arm: m["steady_tokens_per_s"] for arm, m in med.items()}
    for name, arm in (("ratio", "plain"), ("shared_gain", "separate"), ("one_worker_gain", "two_workers")):
        if arm in rate:
            out[name] = rate["trainer"] / rate[arm]
    if "bf16_autocast" in rate:  # the gain of turning it on: the trainer is the denominator
        out["bf16_gain"] = rate["bf16_autocast"] / rate["trainer"]
    return out


def machine() -> str:
    from psr_ray.runtime.memory import machine_gib

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or "unknown CPU")  # fmt: skip
    return f"{model}, {os.cpu_count()} cores, {machine_gib():.1f} GiB, {platform.system()} {platform.release()}"


def write_table(path: Path, args: argparse.Namespace, cfg: Any, fits: dict, order: list, lines_after: list) -> None:
    from psr_ray.trainer.deepspeed_zero import GRADIENT_CLIPPING

    tcfg = cfg.trainer
    out = [
        "# The CPU trainer against a plain torch loop (bench/trainer_cpu.py)",
        "",
        f"Command: `{' '.join(['bench/trainer_cpu.py', *sys.argv[1:]])}`. Machine: {machine()}; shared with other "
        "engineers' jobs (heavy jobs take turns under a lock; the 1-minute load average after each fit is shown).",
        f"Model `{cfg.model.path}` ({cfg.model.dtype}); {args.pairs} arithmetic step pairs (seed {args.seed}), "
        f"{tcfg.global_batch_size} pairs per optimizer step in micro-batches of {tcfg.micro_batch_size}, "
        f"max_seq_len {tcfg.max_seq_len}, beta {tcfg.beta}, AdamW lr {tcfg.learning_rate:g}, clipping {GRADIENT_CLIPPING}.",
        f"trainer: `train_dpo`, {tcfg.num_workers} Ray Train workers x {tcfg.num_cpus_per_worker} CPU, DeepSpeed "
        f"ZeRO-{tcfg.zero_stage}, gloo, the loop's streamed pairs dataset, a pair's prompt computed once "
        "(`trainer.share_prompt`). separate: the same with `trainer.share_prompt=false` (chosen and rejected as "
        "two rows). two_workers: the same as trainer on 2 workers x 1 CPU (one torch thread each). "
        "bf16_autocast: the same as trainer with `trainer.cpu_bf16_autocast=true`. "
        f"plain: one process, torch.set_num_threads({os.cpu_count()}), policy and reference as plain "
        "HF models, two rows per pair.",
        "",
        "Steady tokens/s: real tokens of the chosen + rejected sequences over the optimizer steps after the first, "
        "in every arm (the trainer's shared prompt counts for both sequences, though computed once; each token goes through the reference forward and the policy forward + backward: policy + reference "
        "tokens/s is twice it). Start-up: call -> end of the first optimizer step, minus that step's tokens at "
        "the steady rate. Teardown: last step -> return (the trainer gathers the weights, writes its ZeRO-3 "
        "checkpoint and the HF export; the plain loop writes nothing).",
        "",
        "| fit | arm | steps | tokens | steady tokens/s | policy + reference tokens/s | start-up s | teardown s | "
        "load avg |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for n, (arm, i, load) in enumerate(order, 1):
        t = fits[arm][i]["timing"]
        out.append(f"| {n} | {arm} | {t.num_steps} | {t.num_tokens:.0f} | {t.steady_tokens_per_s:.1f} | "
                   f"{2 * t.steady_tokens_per_s:.1f} | {t.startup_s:.1f} | {t.teardown_s:.1f} | {load:.2f} |")  # fmt: skip
    path.write_text("\n".join(out + [""] + lines_after) + "\n")


def findings(fits: dict[str, list[dict[str, Any]]], computed: float, cfg_ckpt: bool, arms: list[str]) -> list[str]:
    if not all(fits.get(arm) for arm in arms) or "trainer" not in arms:
        return ["Not finished (or no trainer arm): this table holds the fits done so far."]
    s = summarize(fits)
    trainer = fits["trainer"]
    breakdown = {k: statistics.median(f["breakdown"][k] for f in trainer) for k in trainer[0]["breakdown"]}
    lines = [f"Medians over {len(trainer)} fits per arm:", ""]
    if "ratio" in s:
        verdict = (f"met by {s['ratio'] / GOAL - 1:+.0%} of the goal" if s["ratio"] >= GOAL
                   else f"missed: {1 - s['ratio'] / GOAL:.0%} short of the goal")  # fmt: skip
        lines.append(f"- steady tokens/s: trainer {s['trainer_steady_tokens_per_s']:.1f}, plain "
                     f"{s['plain_steady_tokens_per_s']:.1f}; ratio **{s['ratio']:.2f}x** against the {GOAL}x goal: {verdict}.")  # fmt: skip
    if "shared_gain" in s:
        lines.append(f"- shared prompt: trainer {s['trainer_steady_tokens_per_s']:.1f} against separate "
                     f"{s['separate_steady_tokens_per_s']:.1f} tokens/s, a gain of **{s['shared_gain']:.2f}x**; the packed "
                     f"rows compute {computed:.0%} of the sequences' tokens (at most {1 / computed:.2f}x if time went by tokens).")  # fmt: skip
    if "shared_gain" in s and "ratio" in s:
        lines.append(f"- per row, without the shared prompt: separate {s['separate_steady_tokens_per_s']:.1f} against plain "
                     f"{s['plain_steady_tokens_per_s']:.1f} tokens/s ({s['separate_steady_tokens_per_s'] / s['plain_steady_tokens_per_s']:.2f}x; "
                     f"the trainer recomputes activations in the backward, trainer.gradient_checkpointing={cfg_ckpt}, "
                     "the plain loop does not).")  # fmt: skip
    if "one_worker_gain" in s:
        lines.append(f"- one worker on both CPUs against two workers of one: trainer {s['trainer_steady_tokens_per_s']:.1f} "
                     f"against two_workers {s['two_workers_steady_tokens_per_s']:.1f} tokens/s, **{s['one_worker_gain']:.2f}x**.")  # fmt: skip
    if "bf16_gain" in s:
        lines += bf16_findings(fits, s)
    lines += [
        f"- trainer start-up per fit: **{s['trainer_startup_s']:.1f} s** (worker group {breakdown['group_s']:.1f} s, "
        f"DeepSpeed init + policy + reference engines {breakdown['engines_s']:.1f} s, the first step's extra "
        f"{breakdown['first_step_extra_s']:.1f} s); teardown {s['trainer_teardown_s']:.1f} s."
        + (f" The plain loop's start-up (loading the two models) is {s['plain_startup_s']:.1f} s." if "ratio" in s else ""),
        f"- what a trainer worker's torch ran with (rank 0): {trainer[-1]['threads']}.",
    ]  # fmt: skip
    return lines


def bf16_findings(fits: dict[str, list[dict[str, Any]]], s: dict[str, float]) -> list[str]:
    """bf16 autocast against fp32: speed, and what it does to the numbers DPO reads. At step 1 the policy is
    the reference, so both arms score the same pairs (the same seeded order) with the same weights: the
    difference of their mean chosen log-probabilities is bf16's rounding alone."""

    def med(arm: str, key: str, step: int) -> float:
        return statistics.median(f["history"][step][key] for f in fits[arm])

    first = {arm: med(arm, "train/chosen_logps", 0) for arm in ("trainer", "bf16_autocast")}
    last = {
        arm: (med(arm, "train/loss", -1), med(arm, "train/reward_accuracy", -1)) for arm in ("trainer", "bf16_autocast")
    }
    return [
        f"- bf16 autocast (`trainer.cpu_bf16_autocast=true`) against the fp32 trainer: "
        f"{s['bf16_autocast_steady_tokens_per_s']:.1f} against {s['trainer_steady_tokens_per_s']:.1f} tokens/s, "
        f"**{s['bf16_gain']:.2f}x**. Step 1's mean chosen-step log-probability (policy = reference, same pairs): "
        f"{first['bf16_autocast']:.4f} against {first['trainer']:.4f} ({first['bf16_autocast'] - first['trainer']:+.4f}). "
        f"Last step's loss and reward accuracy: {last['bf16_autocast'][0]:.4f} and {last['bf16_autocast'][1]:.3f} against "
        f"{last['trainer'][0]:.4f} and {last['trainer'][1]:.3f}.",
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=32, help="step pairs per fit (8 per optimizer step)")
    parser.add_argument("--repeats", type=int, default=2, help="fits per arm, in alternation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(HERE / "results" / "trainer_cpu.md"))
    parser.add_argument("--tiny", action="store_true", help="the tiny test model instead (proves the script runs)")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {','.join(ARMS)}")
    parser.add_argument(
        "overrides", nargs="*", help="config overrides for the trainer arms, e.g. trainer.num_workers=1"
    )
    args = parser.parse_args()
    arms = [arm for arm in ARMS if arm in args.arms.split(",")]
    if not arms or set(args.arms.split(",")) - set(ARMS):
        parser.error(f"--arms {args.arms}: give some of {','.join(ARMS)}")

    from transformers import AutoTokenizer

    from psr_ray import config as C
    from psr_ray.pipeline import preflight
    from psr_ray.runtime.cluster import init_ray
    from psr_ray.runtime.models import resolve_model_path

    rows = pair_rows(args.pairs, args.seed)
    fits: dict[str, list[dict[str, Any]]] = {arm: [] for arm in arms}
    order: list[tuple[str, int, float]] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="psr_trainer_cpu_") as tmp:
        overrides = [*args.overrides, f"run.output_dir={tmp}", "run.wandb_mode=disabled"]
        cfg = preflight.validate(C.load([C.DEFAULT_CONFIG], overrides))
        model = resolve_model_path(cfg.model.path, cfg.run.cache_dir)
        if args.tiny:
            from psr_ray.testing import build_tiny_model

            model = build_tiny_model(f"{tmp}/tiny_model")
            cfg = preflight.validate(C.load([C.DEFAULT_CONFIG], [*overrides, f"model.path={model}"]))
        variants = {"trainer": cfg,
                    "separate": dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, share_prompt=False)),
                    "two_workers": dataclasses.replace(cfg, trainer=dataclasses.replace(
                        cfg.trainer, num_workers=2, num_cpus_per_worker=1.0)),
                    "bf16_autocast": dataclasses.replace(cfg, trainer=dataclasses.replace(
                        cfg.trainer, cpu_bf16_autocast=True))}  # fmt: skip
        computed = computed_share(AutoTokenizer.from_pretrained(model), rows, max_seq_len=cfg.trainer.max_seq_len,
                                  micro=cfg.trainer.micro_batch_size)  # fmt: skip
        write_pairs(tmp, rows)
        init_ray(cfg)
        for rep in range(args.repeats):
            for arm in arms:
                if arm == "plain":
                    fit = plain_fit(cfg, model, rows)
                else:
                    fit = trainer_fit(variants[arm], model, tmp, f"{tmp}/{arm}_{rep}")
                gc.collect()
                fits[arm].append(fit)
                order.append((arm, len(fits[arm]) - 1, os.getloadavg()[0]))
                t = fit["timing"]
                print(f"[{arm} {rep + 1}] {t.num_steps} steps, {t.num_tokens:.0f} tokens, steady "
                      f"{t.steady_tokens_per_s:.1f} tokens/s, start-up {t.startup_s:.1f} s, teardown "
                      f"{t.teardown_s:.1f} s", flush=True)  # fmt: skip
                took = f"- the whole run took {(time.perf_counter() - started) / 60:.1f} min."
                write_table(
                    Path(args.out),
                    args,
                    cfg,
                    fits,
                    order,
                    [*findings(fits, computed, cfg.trainer.gradient_checkpointing, arms), took],
                )
    print(Path(args.out).read_text())


if __name__ == "__main__":
    main()
