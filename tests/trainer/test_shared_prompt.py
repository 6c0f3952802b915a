"""A pair's shared prompt computed once (`collate_shared_pairs` + `forward.py`): exact packed rows and mask,
then the per-sequence log-probabilities, the DPO loss and its gradients against the two separate rows on the
tiny Llama, over the shapes the batcher produces (rows of different lengths right-padded, padding to a
multiple, prompts left-truncated alike and differently)."""

from __future__ import annotations

import pytest
import torch
from sample_rows import ROW

from psr_ray.trainer.batches import (
    CHOSEN,
    REJECTED,
    SHARED,
    Encoded,
    collate_pairs,
    collate_shared_pairs,
    encode_pair,
    pack_pair,
    pair_attention_mask,
    sequence_tokens,
)
from psr_ray.trainer.forward import forward_logps
from psr_ray.trainer.loss import sequence_logps, step_dpo_loss

ROWS = [
    ROW,
    dict(ROW, prefix="", step_index=1, chosen="3", rejected="4 apples and then some more apples"),
    dict(ROW, chosen="3 + 4 = 7.", rejected="3 + 4 = 8."),  # steps of one length, their first tokens alike
    dict(ROW, prefix=ROW["prefix"] * 6, step_index=7),  # the longest prompt (218 tokens + the step)
]


def test_pack_pair_shares_the_prompt_but_its_last_token():
    chosen = Encoded([5, 6, 7, 8, 9], [0, 0, 0, 1, 1], False)
    rejected = Encoded([5, 6, 7, 4], [0, 0, 0, 1], False)
    packed = pack_pair(chosen, rejected)
    # Shared: 5, 6; each rest starts with the prompt's last token 7, an unscored one.
    assert packed == {
        "input_ids": [5, 6, 7, 8, 9, 7, 4],
        "loss_mask": [0, 0, 0, 1, 1, 0, 1],
        "position_ids": [0, 1, 2, 3, 4, 2, 3],
        "sequence_ids": [SHARED, SHARED, CHOSEN, CHOSEN, CHOSEN, REJECTED, REJECTED],
    }


def test_pack_pair_of_differently_truncated_prompts_shares_nothing():
    chosen = Encoded([6, 7, 8, 9], [0, 0, 1, 1], True)  # prompt 5 6 7 cut to 6 7 for the longer step
    rejected = Encoded([5, 6, 7, 4], [0, 0, 0, 1], False)
    packed = pack_pair(chosen, rejected)
    assert packed["position_ids"] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert packed["sequence_ids"] == [CHOSEN] * 4 + [REJECTED] * 4
    assert packed["input_ids"] == chosen.input_ids + rejected.input_ids


def test_pair_attention_mask_by_hand():
    mask = pair_attention_mask(torch.tensor([[SHARED, CHOSEN, CHOSEN, REJECTED, 0]]))
    expected = [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 0, 0, 1, 0],  # rejected sees the shared token and itself, not chosen
        [1, 1, 1, 1, 1],  # a padding query sees everything before it (no empty softmax row)
    ]
    assert mask.shape == (1, 1, 5, 5) and mask.dtype == torch.bool
    assert mask[0, 0].long().tolist() == expected


def test_collate_shared_pairs_rows_and_counts(tokenizer):
    max_seq_len = 200
    batch, truncated = collate_shared_pairs(tokenizer, ROWS, max_seq_len=max_seq_len, pad_to_multiple_of=8)
    separate, separate_truncated = collate_pairs(tokenizer, ROWS, max_seq_len=max_seq_len)
    assert truncated == separate_truncated == 2  # both sequences of the last pair
    assert batch["input_ids"].shape[0] == len(ROWS) and batch["input_ids"].shape[1] % 8 == 0
    assert int(sequence_tokens(batch)) == int(separate["attention_mask"].sum())
    for i, row in enumerate(ROWS):
        packed = pack_pair(*encode_pair(tokenizer, row, max_seq_len=max_seq_len))
        n = len(packed["input_ids"])
        for key, values in packed.items():
            assert batch[key][i, :n].tolist() == values
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
        assert batch["sequence_ids"][i, n:].eq(0).all() and batch["loss_mask"][i, n:].eq(0).all()
    # Most of a pair is its prompt: the three untruncated pairs compute theirs once (the last shares nothing).
    assert [n > 100 for n in (batch["sequence_ids"] == SHARED).sum(1).tolist()] == [True] * 3 + [False]


# No truncation; the last pair's prompts cut (to different lengths: its steps differ in length); three pairs'
# cut, one of them alike (equal step lengths).
@pytest.mark.parametrize("max_seq_len", [1024, 200, 140])
def test_logps_loss_and_gradients_equal_the_separate_rows(tiny_model_dir, tokenizer, max_seq_len):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    with torch.no_grad():  # a reference apart from the policy, so the loss and its gradient are not trivial
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    reference.requires_grad_(False)
    policy.train()
    separate, _ = collate_pairs(tokenizer, ROWS, max_seq_len=max_seq_len)
    shared, _ = collate_shared_pairs(tokenizer, ROWS, max_seq_len=max_seq_len, pad_to_multiple_of=8)
    num_shared = (shared["sequence_ids"] == SHARED).sum(1).tolist()
    assert num_shared[1] > 100 and (num_shared[3] < 10) == (max_seq_len < 1024)
    assert (num_shared[0] < 10) == (max_seq_len == 140) and num_shared[2] > 100

    def loss_and_grads(batch, logps_of):
        policy.zero_grad()
        with torch.no_grad():
            ref = logps_of(reference, batch)
        logps = logps_of(policy, batch)
        b = len(ROWS)
        out = step_dpo_loss(logps[:b], logps[b:], ref[:b], ref[b:], beta=0.5)
        out.loss.backward()
        return logps.detach(), ref, out.loss.detach(), {n: p.grad.clone() for n, p in policy.named_parameters()}

    def full_forward(model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        return sequence_logps(logits, batch["input_ids"], batch["loss_mask"])

    want = loss_and_grads(separate, full_forward)
    got = loss_and_grads(shared, forward_logps)
    assert want[0].shape == (2 * len(ROWS),) and want[0].lt(-1).all()
    torch.testing.assert_close(got[0], want[0], atol=1e-4, rtol=1e-5)  # policy log-probs, sums of ~10-60 tokens
    torch.testing.assert_close(got[1], want[1], atol=1e-4, rtol=1e-5)  # reference
    assert abs(want[2].item() - 0.6931) > 1e-3  # the loss moved off ln 2
    torch.testing.assert_close(got[2], want[2], atol=1e-6, rtol=1e-5)
    for name, grad in want[3].items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(got[3][name], grad, atol=1e-6, rtol=1e-4, msg=name)
