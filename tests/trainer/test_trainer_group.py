"""The trainer group on a real 2-worker gloo Ray Train group with ZeRO-3 and the tiny model.

Each `TorchTrainer.fit()` costs 15-20 s on 2 cores, so there are three: one runs the engine pieces directly
and returns what the test compares (partitioning, falling loss, frozen reference, checkpoint and HF export
round trips), one runs `train_dpo` end to end from a Parquet directory, one `train_sft` resuming from it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import trainer_probe
from trainer_probe import components_loop, pair_rows

from psr_ray.config import PSRConfig, TrainerConfig
from psr_ray.data.schema import to_table
from psr_ray.testing import make_pair

pytestmark = pytest.mark.ray

TRAINER = TrainerConfig(
    num_workers=2, micro_batch_size=2, global_batch_size=4, learning_rate=1e-3, sft_learning_rate=1e-3,
    num_epochs=2, sft_num_epochs=2, beta=0.5, max_seq_len=256,
)  # fmt: skip
REQUIRED_METRICS = {
    "train/loss", "train/reward_margin", "train/reward_accuracy", "train/chosen_logps", "train/rejected_logps",
    "train/tokens_per_s", "train/lr",
}  # fmt: skip


@pytest.fixture(scope="module")
def components(ray_cluster, tiny_model_dir, tmp_path_factory):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    ray_cluster.cloudpickle.register_pickle_by_value(trainer_probe)
    out = tmp_path_factory.mktemp("components")
    TorchTrainer(
        components_loop,
        train_loop_config={"tcfg": TRAINER, "model_dir": tiny_model_dir, "out": str(out)},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
        torch_config=TorchConfig(backend="gloo"),
        run_config=RunConfig(storage_path=str(out / "ray"), name="components"),
    ).fit()
    return torch.load(out / "results.pt", weights_only=False), out


def test_parameters_are_partitioned(components, tiny_model_dir):
    from transformers import AutoConfig, AutoModelForCausalLM

    results, _ = components
    full = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_model_dir)).num_parameters()
    for name in ("policy", "reference"):
        assert results[f"{name}_local_numel"] == 0  # only the ZeRO partition lives in ds_tensor
        assert results[f"{name}_ds_numel"] == full
        # Rank 0's slice is about half (partitions are padded to equal sizes).
        assert full / 2 <= results[f"{name}_partition_numel"] < full / 2 + 1024


def test_loss_falls_and_every_rank_trains_all_its_rows(components):
    results, _ = components
    losses = results["losses"]
    # Per epoch: 4 pairs, then rank 1's extra batch of 2 beside a zero-weight step of rank 0.
    assert results["num_pairs"] == [4, 2] * 4 and results["num_steps"] == 8
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at the start
    assert losses[-1] < 0.5 * losses[0]


def inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def expected_sgd_weights(model_dir: str, tcfg: TrainerConfig) -> dict[str, torch.Tensor]:
    """SGD on one process, step by step: each update is the mean DPO gradient over exactly the pairs of its
    optimizer step, clipped to norm 1 as DeepSpeed's `gradient_clipping` does."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from psr_ray.trainer.batches import collate_pairs
    from psr_ray.trainer.loss import sequence_logps, step_dpo_loss

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).requires_grad_(False)
    rows = pair_rows(7)
    for window in trainer_probe.SGD_WINDOWS:
        batch, _ = collate_pairs(tokenizer, [rows[i] for i in window], max_seq_len=tcfg.max_seq_len)
        b = len(window)

        pol = sequence_logps(policy(**inputs(batch)).logits, batch["input_ids"], batch["loss_mask"])
        with torch.no_grad():
            ref = sequence_logps(reference(**inputs(batch)).logits, batch["input_ids"], batch["loss_mask"])
        loss = step_dpo_loss(pol[:b], pol[b:], ref[:b], ref[b:], beta=tcfg.beta).loss
        policy.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        with torch.no_grad():
            for p in policy.parameters():
                p -= trainer_probe.SGD_LR * p.grad
    return {k: v.detach() for k, v in policy.state_dict().items()}


def test_each_pair_is_trained_once_with_equal_weight(components, tiny_model_dir):
    """7 pairs on 2 ranks (4 + 3), 4 pairs per optimizer step: 2 updates, the second from 3 real pairs and a
    zero-weight micro-step; each update equals SGD on the mean gradient of exactly its pairs."""
    from transformers import AutoModelForCausalLM

    results, _ = components
    assert results["sgd_num_pairs"] == [4, 3]
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).state_dict()
    expected = expected_sgd_weights(tiny_model_dir, TRAINER)
    got = results["sgd_weights"]
    moved = max((got[k] - initial[k]).abs().max().item() for k in got)
    error = max((got[k] - expected[k]).abs().max().item() for k in got)
    assert moved > 1e-2 and error < 1e-5, (moved, error)


def test_heldout_metrics_are_zero_while_the_policy_is_its_reference(components):
    at_start = components[0]["heldout_at_start"]
    assert at_start["heldout/num_pairs"] == 5 and at_start["heldout/num_tokens"] > 5
    assert at_start["heldout/kl_per_token"] == pytest.approx(0.0, abs=1e-6)
    assert at_start["heldout/reward_margin"] == pytest.approx(0.0, abs=1e-6)
    assert at_start["heldout/reward_accuracy"] == 0.0


def test_reference_stays_bit_identical(components):
    results, _ = components
    assert results["reference_identical"]
    # The policy trains in training mode (HF checkpoints activations only then), the reference stays in eval.
    assert results["modes"] == {"policy": True, "reference": False}
    assert "lm_head.weight" in results["reference_names"]


def test_checkpoint_reload_and_hf_export_give_identical_logits(components):
    from transformers import AutoModelForCausalLM

    from psr_ray.trainer.loss import sequence_logps

    results, out = components
    torch.testing.assert_close(results["reloaded_logits"], results["trained_logits"], rtol=0, atol=1e-6)
    exported = AutoModelForCausalLM.from_pretrained(out / "ckpt" / "hf", dtype=torch.float32)
    probe = results["probe"]
    with torch.no_grad():
        logits = exported(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    torch.testing.assert_close(logits, results["trained_logits"], rtol=0, atol=1e-5)
    torch.testing.assert_close(
        sequence_logps(logits, probe["input_ids"], probe["loss_mask"]), results["trained_logps"], rtol=0, atol=1e-4
    )


def write_pairs(directory: Path, rows: list[dict]) -> Path:
    pairs = [
        make_pair(
            f"p{i}",
            row["step_index"],
            question=row["question"],
            prefix=row["prefix"],
            chosen=row["chosen"],
            rejected=row["rejected"],
            candidates=[row["chosen"], row["rejected"]],
        )  # fmt: skip
        for i, row in enumerate(rows)
    ]
    directory.mkdir(parents=True)
    pq.write_table(to_table(pairs[:4]), directory / "part-0.parquet")
    pq.write_table(to_table(pairs[4:]), directory / "part-1.parquet")
    return directory


def test_bad_inputs_fail_before_training(ray_cluster, tiny_model_dir, tmp_path):
    from psr_ray.trainer.group import read_pairs_dataset, train_dpo

    with pytest.raises(ValueError, match="lacks columns"):
        train_dpo(
            PSRConfig(trainer=TRAINER), policy_path=tiny_model_dir, reference_path=tiny_model_dir,
            dataset=ray_cluster.data.from_items([{"question": "q", "chosen": "a"}]),
            output_dir=str(tmp_path / "out"), policy_version=1,
        )  # fmt: skip

    for heldout, message in ((str(tmp_path / "none.parquet"), "no such Parquet file"),
                             ([{"question": "q", "prefix": "", "step_index": 1, "chosen": "a"}], r"row 0 has no \['rejected'\]")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            train_dpo(
                PSRConfig(trainer=TRAINER), policy_path=tiny_model_dir, reference_path=tiny_model_dir,
                dataset=ray_cluster.data.from_items(pair_rows(2)), output_dir=str(tmp_path / "out"), policy_version=1,
                heldout=heldout,
            )  # fmt: skip
    with pytest.raises(ValueError, match="not a directory of .parquet"):
        read_pairs_dataset(str(tmp_path / "missing"))
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "x.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match="not a readable Parquet file"):
        read_pairs_dataset(str(tmp_path / "corrupt"))
    (tmp_path / "wrong").mkdir()
    pq.write_table(pa.table({"question": ["q"]}), tmp_path / "wrong" / "x.parquet")
    with pytest.raises(ValueError, match="lacks columns"):
        read_pairs_dataset(str(tmp_path / "wrong"))


@pytest.fixture(scope="module")
def dpo_result(ray_cluster, tiny_model_dir, tmp_path_factory):
    from psr_ray.trainer.group import read_pairs_dataset, train_dpo

    root = tmp_path_factory.mktemp("dpo")
    # An odd count over 2 workers: Ray Train's default split drops a row, stopping at the shortest shard drops
    # more, and 7 pairs at global batch 4 end in a partial accumulation window.
    dataset = read_pairs_dataset(str(write_pairs(root / "pairs", pair_rows(7))))
    marker = root / "pushed.txt"

    class GatheredWeights:  # a weight sender that keeps what it is given (defined here: Ray ships it by value)
        backend = "test"

        def send(self, state_dict, *, policy_version):  # every rank pushes; only rank 0 has the weights
            if state_dict is None:
                (root / "pushed_none.txt").write_text("rank without weights")
            else:
                marker.write_text(f"{policy_version} {sum(t.numel() for t in state_dict.values())}")
                torch.save(state_dict, root / "gathered.pt")  # what the weight sync would send

    # Held-out pairs of the same kind, never trained on (a Parquet file, as the oracle writes them).
    heldout = [dict(row, question=row["question"].replace("Sam", "Ana")) for row in pair_rows(12)[7:]]
    pq.write_table(pa.Table.from_pylist(heldout), root / "heldout.parquet")
    # With the memory levers of the embedded preset on (checkpointing, small ZeRO-3 buffers): same results.
    levers = dataclasses.replace(TRAINER, gradient_checkpointing=True, zero3_buffer_numel=20_000)
    result = train_dpo(
        PSRConfig(trainer=levers), policy_path=tiny_model_dir, reference_path=tiny_model_dir, dataset=dataset,
        output_dir=str(root / "trainer"), policy_version=1, weight_sender=GatheredWeights(),
        heldout=str(root / "heldout.parquet"),
    )  # fmt: skip
    return result, root


def test_train_dpo_end_to_end(dpo_result, tiny_model_dir, ray_cluster):
    from transformers import AutoModelForCausalLM

    from psr_ray.trainer import checkpoint as ckpt

    result, root = dpo_result
    # Every committed pair trained exactly once per epoch: 7 pairs x 2 epochs, in steps of at most 4 pairs.
    trained = [m["train/num_pairs"] for m in result.metrics]
    assert sum(trained) == 7 * 2 and max(trained) <= 4
    assert result.num_optimizer_steps == len(result.metrics) >= 4
    assert all(REQUIRED_METRICS <= set(m) for m in result.metrics)
    assert result.metrics[-1]["train/loss"] < result.metrics[0]["train/loss"]
    assert result.metrics[-1]["train/reward_accuracy"] == 1.0
    # The default schedule: constant, no warm-up configured.
    assert [m["train/lr"] for m in result.metrics] == [pytest.approx(1e-3)] * len(result.metrics)
    assert result.num_trained_rows == 14
    # The trained policy moved away from its reference on pairs it never saw, in the preferred direction.
    heldout = result.heldout
    assert heldout["heldout/num_pairs"] == 5 and heldout["heldout/kl_per_token"] > 1e-4
    assert heldout["heldout/reward_margin"] > 0 and heldout["heldout/reward_accuracy"] >= 0.8
    assert {k: v for k, v in result.metrics[-1].items() if k.startswith("heldout/")} == {}  # per fit, not per step
    # Each worker's measured memory beside the parts computed from the model's sizes (trainer/memory_budget.py).
    final = result.metrics[-1]
    for rank in (0, 1):
        assert (
            final[f"memory/worker{rank}_peak_rss_gib"]
            >= final[f"memory/worker{rank}_pss_gib"]
            > final["memory/runtime_gib"]
            > 0
        )
    parts = [v for k, v in final.items() if k.startswith("memory/") and k.endswith("_gib") and "worker" not in k
             and k != "memory/accounted_gib"]  # fmt: skip
    assert final["memory/accounted_gib"] == pytest.approx(sum(parts))
    assert final["memory/activations_gib"] > 0 and final["memory/reduce_bucket_gib"] == 20_000 * 4 / 2**30
    assert 0 < final["train/max_micro_logit_rows"] < final["train/max_micro_tokens"]  # logits at scored positions only

    checkpoint = Path(result.checkpoint_dir)
    assert ckpt.read_version(checkpoint)["policy_version"] == 1
    assert (checkpoint / ckpt.CONFIG_FILE).is_file() and (checkpoint / ckpt.DS_DIR / ckpt.DS_TAG).is_dir()
    exported = AutoModelForCausalLM.from_pretrained(result.hf_dir, dtype=torch.float32)
    state_dict = torch.load(root / "gathered.pt")
    assert (root / "pushed.txt").read_text() == f"1 {sum(t.numel() for t in state_dict.values())}"
    assert (root / "pushed_none.txt").is_file()
    for name, tensor in exported.state_dict().items():
        assert torch.equal(tensor, state_dict[name]), name
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert not torch.equal(initial.lm_head.weight, exported.lm_head.weight)
    # Beside the export, the probe's reference computed from the exported tensors (what the sync stage uses).
    from transformers import AutoTokenizer

    from psr_ray.weight_sync.probe import make_probe, read_reference, reference_logprobs

    probe = make_probe(AutoTokenizer.from_pretrained(tiny_model_dir), tiny_model_dir)
    recorded, expected = read_reference(result.hf_dir, probe), reference_logprobs(state_dict, probe)
    assert recorded is not None and recorded["prompt"] == pytest.approx(expected["prompt"], abs=1e-6)
    assert recorded["next"] == pytest.approx(expected["next"], abs=1e-6)


def test_train_sft_resumes_from_latest_checkpoint(dpo_result, tiny_model_dir, ray_cluster):
    from transformers import AutoTokenizer

    from psr_ray.core.prompts import render_solution_prompt
    from psr_ray.trainer import checkpoint as ckpt
    from psr_ray.trainer.group import train_dpo, train_sft

    dpo, root = dpo_result
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [
        {"prompt_text": render_solution_prompt(tokenizer, r["question"]), "target_text": r["chosen"]}
        for r in pair_rows(8)
    ]
    # Same output_dir: the DPO checkpoint (version 1) is the latest, so SFT version 2 starts from its shards.
    result = train_sft(
        PSRConfig(trainer=TRAINER), model_path=tiny_model_dir, dataset=ray_cluster.data.from_items(rows),
        output_dir=str(root / "trainer"), policy_version=2,
    )  # fmt: skip
    # 8 rows x 2 epochs, each once per epoch, however the unequal split dealt them.
    assert sum(m["train/num_rows"] for m in result.metrics) == result.num_trained_rows == 16
    assert len(result.metrics) >= 4 and result.metrics[-1]["train/loss"] < result.metrics[0]["train/loss"]
    assert ckpt.read_version(result.checkpoint_dir)["resumed_from"] == dpo.checkpoint_dir
    assert "train/reward_margin" not in result.metrics[0]

    # A version that already has a checkpoint is returned from disk, without training.
    again = train_dpo(
        PSRConfig(trainer=TRAINER), policy_path=tiny_model_dir, reference_path=tiny_model_dir,
        dataset=ray_cluster.data.from_items(pair_rows(2)), output_dir=str(root / "trainer"), policy_version=2,
    )  # fmt: skip
    assert again.resumed and again.checkpoint_dir == result.checkpoint_dir and again.metrics == result.metrics


def test_train_sft_runs_with_its_own_memory_settings(tiny_model_dir, ray_cluster, tmp_path):
    # The init's SFTs may run another ZeRO stage, micro batch and checkpointing than the DPO fits; the
    # checkpoint records what the fit ran with, and passes the integrity check for that stage.
    from transformers import AutoTokenizer

    from psr_ray.core.prompts import render_solution_prompt
    from psr_ray.trainer import checkpoint as ckpt
    from psr_ray.trainer.group import train_sft

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [{"prompt_text": render_solution_prompt(tokenizer, r["question"]), "target_text": r["chosen"]}
            for r in pair_rows(8)]  # fmt: skip
    trainer = dataclasses.replace(TRAINER, gradient_checkpointing=True, sft_micro_batch_size=2,
                                  sft_gradient_checkpointing=False, sft_zero_stage=2)  # fmt: skip
    result = train_sft(PSRConfig(trainer=trainer), model_path=tiny_model_dir,
                       dataset=ray_cluster.data.from_items(rows), output_dir=str(tmp_path / "sft"))  # fmt: skip
    assert sum(m["train/num_rows"] for m in result.metrics) == result.num_trained_rows == 16
    assert result.metrics[-1]["train/loss"] < result.metrics[0]["train/loss"]
    ckpt.check_checkpoint(Path(result.checkpoint_dir))
    recorded = json.loads((Path(result.checkpoint_dir) / ckpt.CONFIG_FILE).read_text())["trainer"]
    assert (recorded["zero_stage"], recorded["gradient_checkpointing"], recorded["micro_batch_size"]) == (2, False, 2)
