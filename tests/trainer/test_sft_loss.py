"""The SFT loss weighs rows, not tokens: each row's mean token loss, then the mean over rows (issue 24 item 2)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from psr_ray.trainer.loss import sequence_logps, sft_row_losses


def _hand_row_means(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> list[float]:
    """Each row's mean of -log p(label_t | < t) over its masked positions, one token at a time."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    means = []
    for b in range(labels.shape[0]):
        nll = [-logp[b, t - 1, labels[b, t]].item() for t in range(1, labels.shape[1]) if mask[b, t]]
        means.append(sum(nll) / len(nll))
    return means


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(3)
    logits = torch.randn(2, 9, 7)
    labels = torch.randint(0, 7, (2, 9))
    mask = torch.zeros(2, 9, dtype=torch.long)
    mask[0, 2:9] = 1  # a long target (an IFT solution): 7 tokens
    mask[1, 6:8] = 1  # a short one (an EFT verdict): 2 tokens, then padding
    return logits, labels, mask


def test_sft_row_losses_are_each_rows_mean_token_loss():
    logits, labels, mask = _batch()
    got = sft_row_losses(sequence_logps(logits, labels, mask), mask)
    assert got.tolist() == pytest.approx(_hand_row_means(logits, labels, mask), abs=1e-5)


def test_a_short_row_weighs_what_a_long_row_weighs():
    # Row losses 1 (7 tokens of loss 1) and 3 (2 tokens of loss 3): the SFT loss is their mean, 2, where a
    # per-token mean would give (7 + 6) / 9 = 1.44.
    logps = torch.tensor([-7.0, -6.0])
    mask = torch.tensor([[0] + [1] * 7, [0] * 6 + [1] * 2])
    assert sft_row_losses(logps, mask).mean().item() == pytest.approx(2.0)
    assert (-logps.sum() / mask[:, 1:].sum()).item() == pytest.approx(13 / 9)


class _Policy(torch.nn.Module):
    """What `sft_micro_step` asks of a DeepSpeed engine: a HF-style forward through an output head (here the
    identity on fixed logits) and `backward(loss)`."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = torch.nn.Parameter(logits.clone())
        self.head = torch.nn.Identity()
        self.losses: list[float] = []

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.head

    def forward(self, *, input_ids, attention_mask, use_cache, logits_to_keep):
        assert logits_to_keep == 0  # every position reaches the head, whose pre-hook keeps the scored ones
        return SimpleNamespace(logits=self.head(self.logits))

    def backward(self, loss: torch.Tensor) -> None:
        self.losses.append(loss.item())
        loss.backward()


def test_sft_micro_step_backpropagates_the_scaled_sum_of_row_means():
    from psr_ray.trainer.worker import sft_micro_step, step_metrics

    logits, labels, mask = _batch()
    policy = _Policy(logits)
    batch = {"input_ids": labels, "attention_mask": torch.ones_like(labels), "loss_mask": mask}
    # The window's loss scale for 2 rows, accumulation 1, one rank: 1 / 2 -> the loss is the mean over rows.
    sums = sft_micro_step(policy, batch, loss_scale=0.5)
    means = _hand_row_means(logits, labels, mask)
    assert policy.losses == [pytest.approx(sum(means) / 2, abs=1e-5)]
    metrics = step_metrics("sft", sums, lr=1e-3, seconds=1.0, step=1, truncated=0)
    assert metrics["train/loss"] == pytest.approx(sum(means) / 2, abs=1e-5)
    assert metrics["train/token_loss"] == pytest.approx((means[0] * 7 + means[1] * 2) / 9, abs=1e-5)
    assert (metrics["train/num_rows"], metrics["train/num_target_tokens"]) == (2.0, 9.0)
    assert not math.isclose(metrics["train/loss"], metrics["train/token_loss"])
