"""The per-worker loop of the trainer group (Ray Train `train_loop_per_worker`): step-DPO or SFT on ZeRO-3.

Every committed row is trained exactly once per epoch:
- Each rank reads its own share of the "pairs" dataset as it streams in (split without dropping rows:
  `data_split.py`), shuffled within a bounded buffer seeded by `seed + epoch`.
- Rows go in accumulation windows: each rank collates up to `gradient_accumulation_steps` micro-batches,
  then the ranks agree (all-reduce) on the window's micro-step count (the most any rank has) and its number
  of real units (pairs; rows for SFT). An epoch ends when no rank has a row left.
- ZeRO-3 runs collectives inside every forward/backward, so a rank with fewer micro-batches runs zero-weight
  micro-steps (a fixed padding row, its loss times 0) beside the others.
- The last micro-step of every window, a partial one included, is the accumulation boundary, so an epoch's
  trailing rows are stepped too.
- Each unit's loss is weighted `accumulation x world_size / units in the window`: DeepSpeed divides the loss
  by the accumulation steps and averages gradients over the ranks, so each optimizer step follows the mean
  gradient over exactly its real units.
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from psr_ray.runtime import kill_windows
from psr_ray.runtime.cluster import cpu_threads
from psr_ray.runtime.memory import read_pss
from psr_ray.trainer.batches import (
    PADDING_ROWS,
    collate_pairs,
    collate_sft,
    collate_shared_pairs,
    rows_of,
    sequence_tokens,
)
from psr_ray.trainer.forward import forward_logps
from psr_ray.trainer.loss import scored_mask, sft_row_losses, step_dpo_loss
from psr_ray.trainer.staging import staging_dir

DATASET_NAME = "pairs"


@dataclass(frozen=True)
class MicroBatch:
    batch: dict[str, torch.Tensor]
    num_rows: int
    num_units: int  # what the loss averages over: pairs (DPO) or rows (SFT: each row's mean token loss)
    num_truncated: int


def collate_micro_batch(
    mode: str,
    tokenizer: Any,
    rows: list[dict[str, Any]],
    *,
    max_seq_len: int,
    pad_to_multiple_of: int = 1,
    share_prompt: bool = True,
) -> MicroBatch:
    """`rows` as one micro-batch; DPO pairs packed one per row (`collate_shared_pairs`) with `share_prompt`."""
    collate = collate_sft if mode != "dpo" else collate_shared_pairs if share_prompt else collate_pairs
    batch, truncated = collate(tokenizer, rows, max_seq_len=max_seq_len, pad_to_multiple_of=pad_to_multiple_of)
    return MicroBatch(batch, len(rows), len(rows), truncated)


def dpo_micro_step(
    policy: Any, reference: Any, batch: dict[str, torch.Tensor], *, beta: float, loss_scale: float
) -> torch.Tensor:
    """Forward and backward of one micro-batch of B pairs ([2B, T]: chosen rows then rejected rows, or [B, T']
    packed pair rows) with the sum of its pairs' losses times `loss_scale`; returns [loss sum, margin, correct,
    chosen_logps, rejected_logps, pairs, tokens, computed tokens] for the step's metrics."""
    # Reference first, so its logits are freed before the policy's activations exist.
    with torch.no_grad():
        ref = forward_logps(reference, batch)
    logps = forward_logps(policy, batch)
    b = logps.shape[0] // 2
    out = step_dpo_loss(logps[:b], logps[b:], ref[:b], ref[b:], beta=beta)
    policy.backward(out.loss * b * loss_scale)
    margin = out.chosen_rewards - out.rejected_rewards
    return torch.stack(
        [
            out.loss.detach().float() * b,
            margin.sum().float(),
            (margin > 0).sum().float(),
            logps[:b].detach().sum().float(),
            logps[b:].detach().sum().float(),
            torch.tensor(float(b), device=logps.device),
            sequence_tokens(batch).float(),  # the sequences' tokens, a packed row's shared part twice
            batch["attention_mask"].sum().float(),  # the tokens the model computed
        ]
    )


def sft_micro_step(policy: Any, batch: dict[str, torch.Tensor], *, loss_scale: float) -> torch.Tensor:
    """The sum of the rows' mean token cross-entropies (`sft_row_losses`), times `loss_scale`; returns [row loss
    sum, token loss sum, targets, tokens, rows]."""
    logps = forward_logps(policy, batch)
    row_losses = sft_row_losses(logps, batch["loss_mask"])
    policy.backward(row_losses.sum() * loss_scale)
    return torch.stack(
        [
            row_losses.detach().sum().float(),
            -logps.detach().sum().float(),
            batch["loss_mask"][:, 1:].sum().float(),
            batch["attention_mask"].sum().float(),
            torch.tensor(float(batch["input_ids"].shape[0]), device=logps.device),
        ]
    )


def step_metrics(
    mode: str, sums: torch.Tensor, *, lr: float, seconds: float, step: int, truncated: int, ended_at: float = 0.0
) -> dict[str, float]:
    """All-reduced sums of one optimizer step -> the named metrics; `ended_at`: the step's end (unix s)."""
    if mode == "dpo":
        loss, margin, correct, chosen, rejected, pairs, tokens, computed = sums.tolist()
        n = max(pairs, 1.0)
        metrics = {
            "train/loss": loss / n,
            "train/reward_margin": margin / n,
            "train/reward_accuracy": correct / n,
            "train/chosen_logps": chosen / n,
            "train/rejected_logps": rejected / n,
            "train/num_pairs": pairs,
        }
    else:
        loss, token_loss, targets, tokens, rows = sums.tolist()
        computed = tokens
        metrics = {
            "train/loss": loss / max(rows, 1.0),  # the mean over rows of each row's mean token loss
            "train/token_loss": token_loss / max(targets, 1.0),  # the mean over all target tokens
            "train/num_target_tokens": targets,
            "train/num_rows": rows,
        }
    metrics.update(
        {
            "train/tokens_per_s": tokens / max(seconds, 1e-9),
            # Real tokens of the step's sequences (all ranks, no padding) and its wall time on this rank, data
            # wait included: what bench/trainer_cpu.py sums into a steady rate (trainer/fit_timing.py).
            "train/num_tokens": tokens,
            # What the model ran on: fewer than num_tokens where pairs share their prompt (FLOPs, MFU).
            "train/num_computed_tokens": computed,
            "train/step_s": seconds,
            "train/step_end_unix_s": ended_at,  # the step on the caller's clock: a fit's start-up cost
            "train/lr": lr,
            "train/step": float(step),
            "train/num_truncated": float(truncated),
        }
    )
    return metrics


def trained_rows(mode: str, history: list[dict[str, float]]) -> int:
    """Rows (pairs, or SFT rows) trained over all the optimizer steps of `history`."""
    return int(sum(m["train/num_pairs" if mode == "dpo" else "train/num_rows"] for m in history))


def agree_on_window(local: list[MicroBatch], device: torch.device) -> tuple[int, int]:
    """(micro-steps, real units) of the window over all ranks: the most micro-batches any rank has, and the
    units of all of them. A collective: every rank calls it once per window."""
    most = torch.tensor([len(local)], dtype=torch.long, device=device)
    units = torch.tensor([sum(m.num_units for m in local)], dtype=torch.long, device=device)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    dist.all_reduce(units, op=dist.ReduceOp.SUM)
    return int(most.item()), int(units.item())


def train_epochs(
    mode: str,
    policy: Any,
    reference: Any | None,
    shard: Any,
    tokenizer: Any,
    *,
    beta: float,
    max_seq_len: int,
    micro_batch_size: int,
    num_epochs: int,
    pad_to_multiple_of: int = 1,
    shuffle_buffer_size: int = 0,
    seed: int = 0,
    report: Any = None,
    share_prompt: bool = True,
) -> list[dict[str, float]]:
    """Trains over `shard` (anything with Ray Data's `iter_batches`) `num_epochs` times, every row once per
    epoch (module docstring); returns one metrics dict per optimizer step, after calling `report(metrics)`
    on every rank (a barrier in Ray Train)."""
    device = policy.device
    accumulation = policy.gradient_accumulation_steps()
    world_size = dist.get_world_size()
    kwargs: dict[str, Any] = {
        "max_seq_len": max_seq_len,
        "pad_to_multiple_of": pad_to_multiple_of,
        "share_prompt": share_prompt,
    }
    padding = collate_micro_batch(mode, tokenizer, [PADDING_ROWS[mode]], **kwargs)
    history: list[dict[str, float]] = []
    truncated = 0
    largest = torch.zeros(2, dtype=torch.long, device=device)  # the largest micro-batch: tokens, logit rows
    for epoch in range(num_epochs):
        shuffle = {"local_shuffle_buffer_size": shuffle_buffer_size, "local_shuffle_seed": seed + epoch}
        batches = iter(
            shard.iter_batches(
                batch_size=micro_batch_size, batch_format="pyarrow", drop_last=False,
                **(shuffle if shuffle_buffer_size else {}),
            )
        )  # fmt: skip
        while True:
            started = time.perf_counter()
            local = [
                collate_micro_batch(mode, tokenizer, rows_of(raw), **kwargs)
                for raw in itertools.islice(batches, accumulation)
            ]
            data_wait = time.perf_counter() - started
            num_micro, num_units = agree_on_window(local, device)
            if num_micro == 0:
                break
            loss_scale = accumulation * world_size / max(num_units, 1)
            lr = float(policy.get_lr()[0])
            window = None
            for i in range(num_micro):
                real = i < len(local)
                batch = {k: v.to(device) for k, v in (local[i] if real else padding).batch.items()}
                if real:
                    shape = [batch["input_ids"].numel(), int(scored_mask(batch["loss_mask"]).sum())]
                    largest = torch.maximum(largest, torch.tensor(shape, device=device))
                policy.set_gradient_accumulation_boundary(i == num_micro - 1)
                if mode == "dpo":
                    sums = dpo_micro_step(policy, reference, batch, beta=beta, loss_scale=loss_scale if real else 0.0)
                else:
                    sums = sft_micro_step(policy, batch, loss_scale=loss_scale if real else 0.0)
                policy.step()  # an optimizer step only at the boundary set above
                sums = sums if real else torch.zeros_like(sums)
                window = sums if window is None else window + sums
            assert window is not None  # num_micro >= 1: the loop above ran
            truncated += sum(m.num_truncated for m in local)
            dist.all_reduce(window)
            total_truncated = torch.tensor([truncated], device=device)
            dist.all_reduce(total_truncated)
            dist.all_reduce(largest, op=dist.ReduceOp.MAX)
            metrics = step_metrics(
                mode, window, lr=lr, seconds=time.perf_counter() - started, step=len(history) + 1,
                truncated=int(total_truncated.item()), ended_at=time.time(),
            )  # fmt: skip
            metrics["train/data_wait_s"] = data_wait
            metrics["train/max_micro_tokens"], metrics["train/max_micro_logit_rows"] = map(float, largest.tolist())
            history.append(metrics)
            if report is not None:
                report(metrics)
            kill_windows.reached("train.after_step")
    return history


def worker_memory(policy: Any, tcfg: Any, world_size: int, last: dict[str, float], runtime_bytes: int, *,
                  with_reference: bool) -> dict[str, float]:  # fmt: skip
    """The `memory/*` metrics: every rank's peak RSS and PSS now (a collective), against the budget of the
    largest micro-batch seen (`last`: the final step's metrics)."""
    import resource

    from psr_ray.trainer.memory_budget import ModelSizes, memory_metrics, worker_budget

    mine = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, read_pss(os.getpid())[0])  # ru_maxrss: KiB
    measured: list[Any] = [None] * world_size
    dist.all_gather_object(measured, mine)
    sizes = ModelSizes.of(policy.module.config, [getattr(p, "ds_numel", p.numel()) for p in policy.module.parameters()])
    budget = worker_budget(sizes, world_size=world_size, with_reference=with_reference,
                           max_tokens=int(last["train/max_micro_tokens"]), max_logit_rows=int(last["train/max_micro_logit_rows"]),
                           gradient_checkpointing=tcfg.gradient_checkpointing, zero3_buffer_numel=tcfg.zero3_buffer_numel)  # fmt: skip
    return memory_metrics(budget, runtime_bytes=runtime_bytes, measured=measured)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Builds the engines, trains, then writes and reports one checkpoint (shards + HF export + metadata)."""
    import ray.train
    from transformers import AutoTokenizer

    from psr_ray import weight_sync
    from psr_ray.runtime import metrics
    from psr_ray.trainer import checkpoint as ckpt
    from psr_ray.trainer.deepspeed_zero import build_policy, build_reference, gather_full_state_dict, prepare_deepspeed
    from psr_ray.trainer.heldout import heldout_metrics
    from psr_ray.weight_sync.probe import make_probe, record_reference

    cfg = loop_config["cfg"]
    tcfg = cfg.trainer
    mode = loop_config["mode"]
    phases: dict[str, float] = {}
    clock = time.perf_counter()
    prepare_deepspeed(tcfg.use_gpu)
    if not tcfg.use_gpu:  # a local cluster starts every process at OMP_NUM_THREADS=1 (runtime/cluster.py)
        torch.set_num_threads(cpu_threads(tcfg.num_cpus_per_worker))
    phases["init_distributed"] = time.perf_counter() - clock
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()

    tokenizer = AutoTokenizer.from_pretrained(loop_config["model_path"])
    runtime_bytes = read_pss(os.getpid())[0]  # this worker before any model: Python, torch, DeepSpeed, Ray
    policy = build_policy(
        loop_config["model_path"],
        tcfg,
        use_gpu=tcfg.use_gpu,
        world_size=world_size,
        learning_rate=loop_config["learning_rate"],
    )
    phases["policy_engine"] = time.perf_counter() - clock - sum(phases.values())
    if loop_config.get("resume_dir"):
        ckpt.load_deepspeed(policy, loop_config["resume_dir"])
    reference = None
    if mode == "dpo":
        reference = build_reference(loop_config["reference_path"], tcfg, use_gpu=tcfg.use_gpu, world_size=world_size)
    phases["reference_engine"] = time.perf_counter() - clock - sum(phases.values())

    history = train_epochs(
        mode,
        policy,
        reference,
        ray.train.get_dataset_shard(DATASET_NAME),
        tokenizer,
        beta=tcfg.beta,
        max_seq_len=tcfg.max_seq_len,
        micro_batch_size=tcfg.micro_batch_size,
        num_epochs=loop_config["num_epochs"],
        pad_to_multiple_of=8 if tcfg.use_gpu else 1,
        shuffle_buffer_size=tcfg.shuffle_buffer_size,
        seed=loop_config["seed"],
        report=metrics.train_reporter(ray.train.report, rank=rank, mode=mode),  # live train metrics
        share_prompt=tcfg.share_prompt,
    )
    phases["train"] = time.perf_counter() - clock - sum(phases.values())
    heldout = {}
    if mode == "dpo" and loop_config.get("heldout_rows"):
        heldout = heldout_metrics(
            policy, reference, loop_config["heldout_rows"], tokenizer, beta=tcfg.beta, max_seq_len=tcfg.max_seq_len,
            micro_batch_size=tcfg.micro_batch_size, pad_to_multiple_of=8 if tcfg.use_gpu else 1,
            share_prompt=tcfg.share_prompt,
        )  # fmt: skip
        phases["heldout"] = time.perf_counter() - clock - sum(phases.values())
    if history and not tcfg.use_gpu:  # host memory per worker beside its parts (trainer/memory_budget.py)
        history[-1] |= worker_memory(
            policy, tcfg, world_size, history[-1], runtime_bytes, with_reference=reference is not None
        )
    sender = loop_config.get("weight_sender")
    # CUDA IPC feeds each engine from the rank on its GPU: every rank needs the whole weights (weight_sync/cuda_ipc.py).
    state_dict = gather_full_state_dict(policy, every_rank=getattr(sender, "every_rank", False))
    with staging_dir(rank) as tmp:  # a killed worker's leftover is swept by the next (trainer/staging.py)
        ckpt.save_deepspeed(policy, tmp)
        sync_report: Any = None  # rank 0's SyncReport
        if sender is not None:
            # Every rank pushes (the weight-sync protocol); rank 0 has the weights, the others give None (or
            # theirs, for a sender that feeds engines from every rank).
            # Rank 0's SyncReport goes into the checkpoint's metadata, and from there into the TrainResult.
            sync_report = weight_sync.push(sender, state_dict,
                                           policy_version=loop_config["policy_version"])  # fmt: skip
        if rank == 0:
            assert state_dict is not None  # rank 0 holds the gathered weights
            ckpt.export_hf(state_dict, policy.module.config, tokenizer, f"{tmp}/{ckpt.HF_DIR}")
            # Beside the export, the probe's reference from these tensors: the sync stage checks an engine
            # reloaded from the export against it without loading the export itself (weight_sync/export.py).
            sender = loop_config.get("weight_sender")
            probe = getattr(sender, "probe", None) or make_probe(tokenizer, loop_config["model_path"])
            record_reference(f"{tmp}/{ckpt.HF_DIR}", state_dict, probe, reference=getattr(sender, "reference", None))
            ckpt.write_metadata(
                tmp,
                policy_version=loop_config["policy_version"],
                config=cfg.to_dict(),
                metrics=history,
                extra={
                    "mode": mode,
                    "num_optimizer_steps": len(history),
                    "num_trained_rows": trained_rows(mode, history),
                    "heldout": heldout,
                    "world_size": world_size,
                    "resumed_from": loop_config.get("resume_dir"),
                    "weight_sync": sync_report.to_dict() if hasattr(sync_report, "to_dict") else None,
                    "phases": dict(phases),  # rank 0's seconds per phase so far: the fit's fixed costs
                },
            )
        phases["checkpoint"] = time.perf_counter() - clock - sum(phases.values())
        if rank == 0:
            print("psr_ray trainer phases (s): " + ", ".join(f"{k} {v:.1f}" for k, v in phases.items()), flush=True)
        final = (dict(history[-1]) if history else {}) | heldout
        final["policy_version"] = loop_config["policy_version"]
        ray.train.report(final, checkpoint=ray.train.Checkpoint.from_directory(tmp))
