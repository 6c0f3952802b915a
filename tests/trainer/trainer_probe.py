"""The engine pieces of the trainer run directly inside a Ray Train worker, for test_trainer_group.py.

A module of its own because Ray workers cannot import test modules: the test registers this one to be
pickled by value. (`torch` is imported inside the function: a by-value function with the `torch` module
in its globals drags torch's config pseudo-modules into the pickle, which fails.)
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa


def pair_rows(n: int) -> list[dict]:
    return [
        {
            "question": f"Sam has {i} pens and gets {i} more. How many pens?",
            "prefix": "" if i % 2 else f"Step 1: Sam starts with {i} pens.\n",
            "step_index": 1 if i % 2 else 2,
            "chosen": f"{i} + {i} = {2 * i} pens.",
            "rejected": f"{i} * {i} = {i * i} pens, because we multiply.",
        }
        for i in range(n)
    ]


class FixedShard:
    """Stands in for a dataset shard: the same rows every epoch, in pyarrow batches."""

    def __init__(self, rows: list[dict]):
        self.table = pa.Table.from_pylist(rows)

    def iter_batches(self, *, batch_size, batch_format, drop_last):
        for start in range(0, self.table.num_rows, batch_size):
            yield self.table.slice(start, batch_size)


def components_loop(config: dict) -> None:
    import ray.train
    import torch
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from psr_ray.trainer import checkpoint as ckpt
    from psr_ray.trainer.batches import collate_pairs
    from psr_ray.trainer.deepspeed_zero import build_policy, build_reference, gather_full_state_dict, prepare_deepspeed
    from psr_ray.trainer.worker import forward_logps, train_epochs

    prepare_deepspeed(False)
    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    tcfg, model_dir, out = config["tcfg"], config["model_dir"], Path(config["out"])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    kwargs = {"use_gpu": False, "world_size": world}
    policy = build_policy(model_dir, tcfg, learning_rate=tcfg.learning_rate, num_training_steps=4, **kwargs)
    reference = build_reference(model_dir, tcfg, **kwargs)
    results: dict = {}
    for name, engine in (("policy", policy), ("reference", reference)):
        params = list(engine.module.parameters())
        results[f"{name}_local_numel"] = sum(p.numel() for p in params)
        results[f"{name}_ds_numel"] = sum(p.ds_numel for p in params)
        results[f"{name}_partition_numel"] = sum(p.ds_tensor.numel() for p in params)
    reference_before = gather_full_state_dict(reference)

    rows = pair_rows(4)
    # Rank 1 holds one extra batch: both ranks must still stop together after one micro-step per epoch.
    shard = FixedShard(rows[2 * rank : 2 * rank + 2] + (rows[:2] if rank == 1 else []))
    history = train_epochs(
        "dpo", policy, reference, shard, tokenizer, beta=tcfg.beta, max_seq_len=tcfg.max_seq_len,
        micro_batch_size=2, num_epochs=4,
    )  # fmt: skip
    reference_after = gather_full_state_dict(reference)

    probe, _ = collate_pairs(tokenizer, rows, max_seq_len=tcfg.max_seq_len)
    with torch.no_grad():
        trained_logits = policy(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
        trained_logps = forward_logps(policy, probe)
    state_dict = gather_full_state_dict(policy)
    ckpt.save_deepspeed(policy, out / "ckpt")
    if rank == 0:
        ckpt.export_hf(state_dict, policy.module.config, tokenizer, out / "ckpt" / ckpt.HF_DIR)
    dist.barrier()

    reloaded = build_policy(model_dir, tcfg, learning_rate=tcfg.learning_rate, num_training_steps=4, **kwargs)
    ckpt.load_deepspeed(reloaded, out / "ckpt")
    with torch.no_grad():
        reloaded_logits = reloaded(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    if rank == 0:
        results.update(
            losses=[m["train/loss"] for m in history],
            num_steps=len(history),
            reference_identical=all(torch.equal(reference_before[k], reference_after[k]) for k in reference_before),
            reference_names=sorted(reference_before),
            probe=probe,
            trained_logits=trained_logits,
            trained_logps=trained_logps,
            reloaded_logits=reloaded_logits,
        )
        torch.save(results, out / "results.pt")
