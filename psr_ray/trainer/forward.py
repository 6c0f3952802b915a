"""The model's forward over a trainer batch, in either layout `batches.py` collates: logits only at the
scored positions, and the summed step log-probabilities per sequence. Torch only (the model is any HF causal
LM, or the DeepSpeed engine around one).

A packed pair batch (`collate_shared_pairs`, the keys `position_ids` and `sequence_ids`) goes through the
model with its own 4D attention mask and position ids; one forward serves chosen and rejected, and the
gradient reaches the shared prompt's tokens from both.
"""

from __future__ import annotations

from typing import Any

import torch

from psr_ray.trainer.batches import CHOSEN, REJECTED, pair_attention_mask
from psr_ray.trainer.loss import scored_positions, sequence_logps


def scored_logits(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [rows, K, V] at the K scored positions, those positions): the head computes logits only where
    a row scores the next token (a step is a few dozen of a row's hundreds of tokens, and full-vocabulary
    logits, with their gradient, were the largest tensors of a micro-step)."""
    positions = scored_positions(batch["loss_mask"])
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if "sequence_ids" in batch:
        inputs |= {"attention_mask": pair_attention_mask(batch["sequence_ids"]), "position_ids": batch["position_ids"]}
    return model(**inputs, use_cache=False, logits_to_keep=positions).logits, positions


def batch_logps(logits: torch.Tensor, positions: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed step log-probabilities of the batch's sequences from `scored_logits`: one per row, or, for a
    packed pair batch of B rows, [2B] (chosen of every pair, then rejected), the order of `collate_pairs`."""
    if "sequence_ids" not in batch:
        return sequence_logps(logits, batch["input_ids"], batch["loss_mask"], positions=positions)
    sequences = batch["sequence_ids"]
    return torch.cat([
        sequence_logps(logits, batch["input_ids"], batch["loss_mask"] * (sequences == which), positions=positions)
        for which in (CHOSEN, REJECTED)
    ])  # fmt: skip


def forward_logps(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """`batch_logps` of one forward of `model` over `batch`."""
    logits, positions = scored_logits(model, batch)
    return batch_logps(logits, positions, batch)
