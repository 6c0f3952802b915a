"""The per-worker loop of the trainer group (Ray Train `train_loop_per_worker`): step-DPO or SFT on ZeRO-3.

Every rank reads its own shard of the "pairs" dataset as it streams in. ZeRO-3 runs collectives inside
every forward/backward, so all ranks must take the same number of micro-steps: before each one the ranks
all-reduce a has-batch flag with MIN and stop together when any shard is exhausted.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from psr_ray.trainer.batches import collate_pairs, collate_sft, rows_of
from psr_ray.trainer.loss import sequence_logps, step_dpo_loss

DATASET_NAME = "pairs"


def lockstep(batches: Iterable[Any], device: torch.device) -> Iterator[Any]:
    """Yields batches while every rank still has one (all_reduce MIN of a has-batch flag)."""
    it = iter(batches)
    while True:
        batch = next(it, None)
        flag = torch.tensor([0 if batch is None else 1], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if int(flag.item()) == 0:
            return
        yield batch


def forward_logps(engine: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return sequence_logps(logits, batch["input_ids"], batch["loss_mask"])


def dpo_micro_step(policy: Any, reference: Any, batch: dict[str, torch.Tensor], *, beta: float) -> torch.Tensor:
    """Forward/backward/step of one micro-batch ([2B, T]: chosen rows then rejected rows); returns the sums
    [loss*B, margin, correct, chosen_logps, rejected_logps, B, tokens] for the step's metrics."""
    b = batch["input_ids"].shape[0] // 2
    # Reference first, so its logits are freed before the policy's activations exist.
    with torch.no_grad():
        ref = forward_logps(reference, batch)
    logps = forward_logps(policy, batch)
    out = step_dpo_loss(logps[:b], logps[b:], ref[:b], ref[b:], beta=beta)
    policy.backward(out.loss)
    policy.step()
    margin = out.chosen_rewards - out.rejected_rewards
    return torch.stack(
        [
            out.loss.detach().float() * b,
            margin.sum().float(),
            (margin > 0).sum().float(),
            logps[:b].detach().sum().float(),
            logps[b:].detach().sum().float(),
            torch.tensor(float(b), device=logps.device),
            batch["attention_mask"].sum().float(),
        ]
    )


def sft_micro_step(policy: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Token-mean cross-entropy on target tokens; returns [loss*targets, targets, tokens]."""
    logps = forward_logps(policy, batch)
    num_targets = batch["loss_mask"][:, 1:].sum().clamp(min=1)
    loss = -logps.sum() / num_targets
    policy.backward(loss)
    policy.step()
    return torch.stack(
        [loss.detach().float() * num_targets, num_targets.float(), batch["attention_mask"].sum().float()]
    )


def step_metrics(
    mode: str, sums: torch.Tensor, *, lr: float, seconds: float, step: int, truncated: int
) -> dict[str, float]:
    """All-reduced sums of one optimizer step -> the named metrics."""
    if mode == "dpo":
        loss, margin, correct, chosen, rejected, pairs, tokens = sums.tolist()
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
        loss, targets, tokens = sums.tolist()
        metrics = {"train/loss": loss / max(targets, 1.0), "train/num_target_tokens": targets}
    metrics.update(
        {
            "train/tokens_per_s": tokens / max(seconds, 1e-9),
            "train/lr": lr,
            "train/step": float(step),
            "train/num_truncated": float(truncated),
        }
    )
    return metrics


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
    report: Any = None,
) -> list[dict[str, float]]:
    """Trains over `shard` (anything with `iter_batches`) `num_epochs` times; returns one metrics dict per
    optimizer step, after calling `report(metrics)` on every rank (a barrier in Ray Train)."""
    device = policy.device
    collate = collate_pairs if mode == "dpo" else collate_sft
    history: list[dict[str, float]] = []
    window: torch.Tensor | None = None
    truncated = 0
    started = waited_since = time.perf_counter()
    data_wait = 0.0
    for _ in range(num_epochs):
        batches = shard.iter_batches(batch_size=micro_batch_size, batch_format="pyarrow", drop_last=False)
        for raw in lockstep(batches, device):
            batch, num_truncated = collate(
                tokenizer, rows_of(raw), max_seq_len=max_seq_len, pad_to_multiple_of=pad_to_multiple_of
            )
            truncated += num_truncated
            batch = {k: v.to(device) for k, v in batch.items()}
            data_wait += time.perf_counter() - waited_since
            boundary = policy.is_gradient_accumulation_boundary()
            lr = float(policy.get_lr()[0])
            if mode == "dpo":
                sums = dpo_micro_step(policy, reference, batch, beta=beta)
            else:
                sums = sft_micro_step(policy, batch)
            window = sums if window is None else window + sums
            if boundary:
                dist.all_reduce(window)
                total_truncated = torch.tensor([truncated], device=device)
                dist.all_reduce(total_truncated)
                now = time.perf_counter()
                metrics = step_metrics(
                    mode,
                    window,
                    lr=lr,
                    seconds=now - started,
                    step=len(history) + 1,
                    truncated=int(total_truncated.item()),
                )
                metrics["train/data_wait_s"] = data_wait
                history.append(metrics)
                if report is not None:
                    report(metrics)
                window, started, data_wait = None, time.perf_counter(), 0.0
            waited_since = time.perf_counter()
    return history


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Builds the engines, trains, then writes and reports one checkpoint (shards + HF export + metadata)."""
    import ray.train
    from transformers import AutoTokenizer

    from psr_ray.trainer import checkpoint as ckpt
    from psr_ray.trainer.deepspeed_zero import build_policy, build_reference, gather_full_state_dict, prepare_deepspeed

    cfg = loop_config["cfg"]
    tcfg = cfg.trainer
    mode = loop_config["mode"]
    phases: dict[str, float] = {}
    clock = time.perf_counter()
    prepare_deepspeed(tcfg.use_gpu)
    phases["init_distributed"] = time.perf_counter() - clock
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()

    tokenizer = AutoTokenizer.from_pretrained(loop_config["model_path"])
    policy = build_policy(
        loop_config["model_path"],
        tcfg,
        use_gpu=tcfg.use_gpu,
        world_size=world_size,
        learning_rate=loop_config["learning_rate"],
        num_training_steps=loop_config["num_training_steps"],
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
        report=ray.train.report,
    )

    phases["train"] = time.perf_counter() - clock - sum(phases.values())
    state_dict = gather_full_state_dict(policy)
    with tempfile.TemporaryDirectory(prefix=f"psr_ckpt_rank{rank}_") as tmp:
        ckpt.save_deepspeed(policy, tmp)
        sync_report = None
        if loop_config.get("on_weights") is not None:
            # Every rank calls it (the weight-sync protocol); only rank 0 has the weights, the others get None.
            # Rank 0's SyncReport goes into the checkpoint's metadata, and from there into the TrainResult.
            sync_report = loop_config["on_weights"](state_dict)
        if rank == 0:
            ckpt.export_hf(state_dict, policy.module.config, tokenizer, f"{tmp}/{ckpt.HF_DIR}")
            ckpt.write_metadata(
                tmp,
                policy_version=loop_config["policy_version"],
                config=cfg.to_dict(),
                metrics=history,
                extra={
                    "mode": mode,
                    "num_optimizer_steps": len(history),
                    "world_size": world_size,
                    "resumed_from": loop_config.get("resume_dir"),
                    "weight_sync": sync_report.to_dict() if hasattr(sync_report, "to_dict") else None,
                },
            )
        phases["checkpoint"] = time.perf_counter() - clock - sum(phases.values())
        if rank == 0:
            print("psr_ray trainer phases (s): " + ", ".join(f"{k} {v:.1f}" for k, v in phases.items()), flush=True)
        final = dict(history[-1]) if history else {}
        final["policy_version"] = loop_config["policy_version"]
        ray.train.report(final, checkpoint=ray.train.Checkpoint.from_directory(tmp))
