"""Tokenization, truncation and padding of step pairs and SFT rows: exact ids and masks on the tiny tokenizer."""

from __future__ import annotations

import pytest
import torch
from sample_rows import ROW

from psr_ray.core.prompts import render_solver_prompt
from psr_ray.trainer.batches import Encoded, collate_pairs, collate_sft, encode_pair, pad_batch


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_pair_is_prompt_then_step_with_step_only_mask(tokenizer):
    prompt = render_solver_prompt(tokenizer, ROW["question"], ROW["prefix"], 2)
    assert prompt.endswith("Step 1: Tom starts with 3 apples.\nStep 2:")
    chosen, rejected = encode_pair(tokenizer, ROW, max_seq_len=1024)
    p, c, r = ids(tokenizer, prompt), ids(tokenizer, " " + ROW["chosen"]), ids(tokenizer, " " + ROW["rejected"])
    assert chosen.input_ids == p + c and rejected.input_ids == p + r
    assert chosen.loss_mask == [0] * len(p) + [1] * len(c)
    assert rejected.loss_mask == [0] * len(p) + [1] * len(r)
    # No EOS appended: the last token is the step's last token.
    assert chosen.input_ids[-1] == c[-1] and tokenizer.eos_token_id not in chosen.input_ids[len(p) :]
    assert not chosen.truncated and not rejected.truncated


def test_collate_pads_to_batch_max_chosen_first(tokenizer):
    other = dict(ROW, prefix="", step_index=1, chosen="3", rejected="4 apples")
    batch, truncated = collate_pairs(tokenizer, [ROW, other], max_seq_len=1024)
    seqs = [*encode_pair(tokenizer, ROW, max_seq_len=1024), *encode_pair(tokenizer, other, max_seq_len=1024)]
    # Row order: chosen of both pairs, then rejected of both.
    ordered = [seqs[0], seqs[2], seqs[1], seqs[3]]
    longest = max(len(s.input_ids) for s in ordered)
    assert truncated == 0
    assert batch["input_ids"].shape == (4, longest) and longest < 1024
    pad = tokenizer.pad_token_id
    for i, s in enumerate(ordered):
        n = len(s.input_ids)
        assert batch["input_ids"][i, :n].tolist() == s.input_ids
        assert batch["input_ids"][i, n:].eq(pad).all()
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (longest - n)
        assert batch["loss_mask"][i].tolist() == s.loss_mask + [0] * (longest - n)


def test_left_truncation_keeps_the_step_and_counts(tokenizer):
    full_c, full_r = encode_pair(tokenizer, ROW, max_seq_len=1024)
    c_len = sum(full_c.loss_mask)
    chosen, rejected = encode_pair(tokenizer, ROW, max_seq_len=c_len + 5)
    assert chosen.truncated and len(chosen.input_ids) == c_len + 5
    # The prompt lost its start, the step is whole.
    assert chosen.input_ids == full_c.input_ids[-(c_len + 5) :]
    assert chosen.loss_mask == [0] * 5 + [1] * c_len
    _, truncated = collate_pairs(tokenizer, [ROW], max_seq_len=c_len + 5)
    assert truncated == (2 if len(full_r.input_ids) > c_len + 5 else 1)


def test_over_long_step_keeps_one_prompt_token(tokenizer):
    chosen, _ = encode_pair(tokenizer, ROW, max_seq_len=4)
    assert chosen.truncated and chosen.loss_mask == [0, 1, 1, 1]
    c = ids(tokenizer, " " + ROW["chosen"])
    assert chosen.input_ids[1:] == c[:3]


def test_sft_masks_target_only(tokenizer):
    row = {
        "prompt_text": "<|im_start|>user\nAdd 2 and 2<|im_end|>\n<|im_start|>assistant\n",
        "target_text": "Step 1: 2 + 2 = 4",
    }
    batch, truncated = collate_sft(tokenizer, [row, dict(row, target_text="4")], max_seq_len=512)
    p, t = ids(tokenizer, row["prompt_text"]), ids(tokenizer, row["target_text"])
    assert truncated == 0
    assert batch["input_ids"][0].tolist() == p + t
    assert batch["loss_mask"][0].tolist() == [0] * len(p) + [1] * len(t)
    assert batch["loss_mask"][1].sum().item() == len(ids(tokenizer, "4"))


def test_pad_to_multiple_and_empty_batch():
    batch = pad_batch([Encoded([5, 6, 7], [0, 1, 1], False)], pad_token_id=0, pad_to_multiple_of=8)
    assert batch["input_ids"].shape == (1, 8)
    assert batch["loss_mask"].tolist() == [[0, 1, 1, 0, 0, 0, 0, 0]]
    assert batch["input_ids"].dtype == torch.long
    with pytest.raises(ValueError, match="empty batch"):
        pad_batch([], pad_token_id=0)
