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


SGD_LR = 0.5  # large, so each pair's share of an update is plain to see


def sgd_shards(rank: int) -> list[dict]:
    """7 pairs: rank 0 holds 4, rank 1 holds 3. With micro-batches of 1 and 4 pairs per optimizer step the
    second step has 3 real pairs and rank 1 takes a zero-weight micro-step in it."""
    rows = pair_rows(7)
    return rows[:4] if rank == 0 else rows[4:]


SGD_WINDOWS = [[0, 1, 4, 5], [2, 3, 6]]  # the pairs of each optimizer step, by index in pair_rows(7)


def components_loop(config: dict) -> None:
    import dataclasses

    import deepspeed
    import ray.train
    import torch
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from psr_ray.trainer import checkpoint as ckpt
    from psr_ray.trainer.batches import collate_pairs
    from psr_ray.trainer.deepspeed_zero import (
        build_policy,
        build_reference,
        ds_config,
        gather_full_state_dict,
        load_model,
        prepare_deepspeed,
    )
    from psr_ray.trainer.heldout import heldout_metrics
    from psr_ray.trainer.worker import forward_logps, train_epochs

    prepare_deepspeed(False)
    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    tcfg, model_dir, out = config["tcfg"], config["model_dir"], Path(config["out"])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    kwargs = {"use_gpu": False, "world_size": world}
    policy = build_policy(model_dir, tcfg, learning_rate=tcfg.learning_rate, **kwargs)
    reference = build_reference(model_dir, tcfg, **kwargs)
    results: dict = {"modes": {"policy": policy.module.training, "reference": reference.module.training}}
    for name, engine in (("policy", policy), ("reference", reference)):
        params = list(engine.module.parameters())
        results[f"{name}_local_numel"] = sum(p.numel() for p in params)
        results[f"{name}_ds_numel"] = sum(p.ds_numel for p in params)
        results[f"{name}_partition_numel"] = sum(p.ds_tensor.numel() for p in params)
    reference_before = gather_full_state_dict(reference)
    # Before any step the policy is its reference: no KL, no margin, no pair "right". 5 pairs on 2 ranks.
    heldout_at_start = heldout_metrics(
        policy, reference, pair_rows(5), tokenizer, beta=tcfg.beta, max_seq_len=tcfg.max_seq_len, micro_batch_size=2
    )

    # Plain SGD on the same ZeRO-3 engine set-up, so the test can recompute every update exactly.
    sgd_tcfg = dataclasses.replace(tcfg, micro_batch_size=1)
    sgd_config = ds_config(sgd_tcfg, learning_rate=0.0, with_optimizer=False, **kwargs)
    sgd_config["zero_allow_untested_optimizer"] = True  # DeepSpeed's guard for optimizers it does not ship
    sgd_model = load_model(model_dir, sgd_config)
    sgd, *_ = deepspeed.initialize(
        model=sgd_model, config=sgd_config, optimizer=torch.optim.SGD(sgd_model.parameters(), lr=SGD_LR)
    )
    sgd_history = train_epochs(
        "dpo", sgd, reference, FixedShard(sgd_shards(rank)), tokenizer, beta=tcfg.beta,
        max_seq_len=tcfg.max_seq_len, micro_batch_size=1, num_epochs=1,
    )  # fmt: skip
    sgd_weights = gather_full_state_dict(sgd)

    rows = pair_rows(4)
    # Rank 1 holds one extra batch: rank 0 runs a zero-weight micro-step beside it, and it is trained.
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

    reloaded = build_policy(model_dir, tcfg, learning_rate=tcfg.learning_rate, **kwargs)
    ckpt.load_deepspeed(reloaded, out / "ckpt")
    with torch.no_grad():
        reloaded_logits = reloaded(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    if rank == 0:
        results.update(
            losses=[m["train/loss"] for m in history],
            num_pairs=[m["train/num_pairs"] for m in history],
            num_steps=len(history),
            sgd_num_pairs=[m["train/num_pairs"] for m in sgd_history],
            heldout_at_start=heldout_at_start,
            sgd_weights=sgd_weights,
            reference_identical=all(torch.equal(reference_before[k], reference_after[k]) for k in reference_before),
            reference_names=sorted(reference_before),
            probe=probe,
            trained_logits=trained_logits,
            trained_logps=trained_logps,
            reloaded_logits=reloaded_logits,
        )
        torch.save(results, out / "results.pt")
