"""Held-out evaluation at the end of a step-DPO fit: how the new policy differs from its frozen reference on
step pairs it never trained on.

    heldout/reward_accuracy   share of pairs whose DPO reward margin r_w - r_l is > 0
    heldout/reward_margin     mean of r_w - r_l (r = beta * (log pi - log pi_ref) of the step's tokens)
    heldout/kl_per_token      mean over the steps' tokens (chosen and rejected) of the exact full-vocabulary
                              KL(pi(. | prefix) || pi_ref(. | prefix)) at that position
    heldout/reward_accuracy_ci95   the half-width of its 95% confidence interval, z sqrt(p (1 - p) / n)
    heldout/num_pairs, heldout/num_tokens

The metric runs on a fixed subsample (`heldout_subsample`): the fewest pairs that give the reward accuracy a
95% confidence interval of +- `trainer.heldout_accuracy_ci` whatever its value. The accuracy is a binomial
proportion, whose normal-approximation half-width z sqrt(p (1 - p) / n) is largest at p = 1/2, so
n = ceil(z^2 / (4 h^2)): 97 pairs at h = 0.1, 385 at 0.05 (all of them when there are fewer). The pairs are
those of the smallest content digests, so every fit of a run, and every seed, measures the same pairs.

Runs inside the Ray Train workers on ZeRO-3 engines: rank r takes pairs r, r + world_size, ...; every rank
runs the same number of forwards (zero-weight padding batches where it has none left), then the sums are
all-reduced, so every rank returns the same figures.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import torch
import torch.distributed as dist

from psr_ray.trainer.batches import DPO_COLUMNS, PADDING_ROWS, collate_pairs, collate_shared_pairs
from psr_ray.trainer.forward import batch_logps, scored_logits
from psr_ray.trainer.loss import step_dpo_loss, token_kl

Z_95 = 1.959964  # the standard normal's 97.5% quantile: a two-sided 95% interval


def pairs_for_ci(half_width: float) -> int:
    """Pairs that give a proportion a 95% CI of +- `half_width` at worst (p = 1/2); 0 for `half_width` 0 (all)."""
    return math.ceil(Z_95**2 / (4 * half_width**2)) if half_width > 0 else 0


def heldout_subsample(rows: list[dict[str, Any]], *, half_width: float) -> list[dict[str, Any]]:
    """The `pairs_for_ci(half_width)` rows of smallest content digest (every row when there are fewer, or when
    `half_width` is 0), in digest order: the same pairs whatever the rows' order, the fit or the seed."""
    num_pairs = pairs_for_ci(half_width)
    ranked = sorted(rows, key=_digest)
    return ranked[:num_pairs] if num_pairs else ranked


def _digest(row: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps([row[c] for c in DPO_COLUMNS]).encode()).hexdigest()


def heldout_metrics(
    policy: Any,
    reference: Any,
    rows: list[dict[str, Any]],
    tokenizer: Any,
    *,
    beta: float,
    max_seq_len: int,
    micro_batch_size: int,
    pad_to_multiple_of: int = 1,
    share_prompt: bool = True,
) -> dict[str, float]:
    """The figures above for `rows` (dicts with `batches.DPO_COLUMNS`); a collective over the trainer group."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    mine = rows[rank::world_size]
    chunks = [mine[i : i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]
    rounds = torch.tensor([len(chunks)], dtype=torch.long, device=policy.device)
    dist.all_reduce(rounds, op=dist.ReduceOp.MAX)
    # correct, margin sum, pairs, KL sum, KL tokens
    sums = torch.zeros(5, dtype=torch.float64, device=policy.device)
    collate = collate_shared_pairs if share_prompt else collate_pairs
    was_training = policy.training
    policy.eval()
    with torch.no_grad():
        for i in range(int(rounds.item())):
            real = i < len(chunks)
            batch, _ = collate(
                tokenizer, chunks[i] if real else [PADDING_ROWS["dpo"]], max_seq_len=max_seq_len,
                pad_to_multiple_of=pad_to_multiple_of,
            )  # fmt: skip
            batch = {k: v.to(policy.device) for k, v in batch.items()}
            ref_scored, scored = scored_logits(reference, batch), scored_logits(policy, batch)
            if not real:
                continue
            logps, ref = batch_logps(scored, batch), batch_logps(ref_scored, batch)
            b = logps.shape[0] // 2
            out = step_dpo_loss(logps[:b], logps[b:], ref[:b], ref[b:], beta=beta)
            margin = out.chosen_rewards - out.rejected_rewards
            kl_sum, kl_tokens = token_kl(scored.logits, ref_scored.logits)
            found = [(margin > 0).sum(), margin.sum(), torch.tensor(b), kl_sum, kl_tokens]
            sums += torch.stack([x.to(sums) for x in found])
    if was_training:
        policy.train()
    dist.all_reduce(sums)
    correct, margin, pairs, kl, tokens = sums.tolist()
    accuracy = correct / max(pairs, 1.0)
    return {
        "heldout/reward_accuracy": accuracy,
        "heldout/reward_accuracy_ci95": Z_95 * math.sqrt(accuracy * (1 - accuracy) / max(pairs, 1.0)),
        "heldout/reward_margin": margin / max(pairs, 1.0),
        "heldout/kl_per_token": kl / max(tokens, 1.0),
        "heldout/num_pairs": pairs,
        "heldout/num_tokens": tokens,
    }
