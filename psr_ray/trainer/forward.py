"""The model's forward over a trainer batch, in either layout `batches.py` collates: logits only at the
scored positions, and the summed step log-probabilities per sequence. Torch only (the model is any HF causal
LM, or the DeepSpeed engine around one).

A packed pair batch (`collate_shared_pairs`, the keys `position_ids` and `sequence_ids`) goes through the
model with its own 4D attention mask and position ids; one forward serves chosen and rejected, and the
gradient reaches the shared prompt's tokens from both.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from psr_ray.trainer.batches import CHOSEN, REJECTED, pair_attention_mask
from psr_ray.trainer.loss import next_tokens, scored_mask, token_logps


class Scored(NamedTuple):
    logits: torch.Tensor  # [N, V]: the head's output at the batch's N scored positions, row-major
    mask: torch.Tensor  # [B, T] bool: which positions those are (`loss.scored_mask`)


def scored_logits(model: Any, batch: dict[str, torch.Tensor]) -> Scored:
    """The logits at the scored positions only, each row's own: the head's input is cut to them before it runs.
    A step is a few dozen of a row's hundreds of tokens, and rows of a batch score different spans (an SFT
    micro batch's union of spans was most of its positions), while the head is a fifth of a 135M model's
    compute and full-vocabulary logits with their gradient were the largest tensors of a micro-step."""
    mask = scored_mask(batch["loss_mask"])
    head = getattr(model, "module", model).get_output_embeddings()  # a DeepSpeed engine wraps the HF model

    def only_scored(_module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (args[0][mask], *args[1:])  # [B, T, H] -> [N, H]; DeepSpeed's own hooks on the head still run

    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if "sequence_ids" in batch:
        inputs |= {"attention_mask": pair_attention_mask(batch["sequence_ids"]), "position_ids": batch["position_ids"]}
    handle = head.register_forward_pre_hook(only_scored)
    try:
        logits = model(**inputs, use_cache=False, logits_to_keep=0).logits  # 0: every position reaches the hook
    finally:
        handle.remove()
    return Scored(logits, mask)


def batch_logps(scored: Scored, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed step log-probabilities of the batch's sequences from `scored_logits`: one per row, or, for a
    packed pair batch of B rows, [2B] (chosen of every pair, then rejected), the order of `collate_pairs`."""
    logits, mask = scored
    rows = mask.nonzero(as_tuple=True)[0]
    logps = token_logps(logits, next_tokens(batch["input_ids"], mask))
    out = torch.zeros(mask.shape[0], dtype=logps.dtype, device=logps.device)
    if "sequence_ids" not in batch:
        return out.index_add(0, rows, logps)
    which = F.pad(batch["sequence_ids"][:, 1:], (0, 1))[mask]  # the sequence of each scored token
    return torch.cat([out.index_add(0, rows, torch.where(which == seq, logps, 0.0)) for seq in (CHOSEN, REJECTED)])


def forward_logps(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """`batch_logps` of one forward of `model` over `batch`."""
    return batch_logps(scored_logits(model, batch), batch)
