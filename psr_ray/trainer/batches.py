"""Tokenization and padding of step pairs (DPO) and prompt/target rows (SFT). Torch only: no Ray, no DeepSpeed.

Prompt and completion are tokenized separately and concatenated: the prompt ends with the `Step k:` header,
the completion is `steps.step_continuation(step)` (" " + step), and together they are exactly the token ids
of the solution written in one piece (what the engine and greedy evaluation emit). No EOS is appended (a step
is not the end of a solution). Loss masks cover the completion tokens only. Over-long rows lose prompt
tokens from the left (the question's start is the most expendable context of a late step), then, only if
the completion alone is too long, completion tokens from the right; both are counted. Batches are padded
to their own longest row, never to `max_seq_len`.

With `share_prompt` (the default), a pair is one packed row instead of two: the tokens chosen and rejected
share from the start (their prompt) once, then chosen's rest, then rejected's rest, each rest attending to
the shared part and to itself only (`pair_attention_mask`), with the position ids it has in its own
sequence. Every token sees exactly the context it has in its own sequence, so the log-probabilities equal
the separate rows' (a ~500-token prompt and two ~80-token steps: ~660 tokens instead of ~1160).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from psr_ray.core.prompts import render_solver_prompt
from psr_ray.core.steps import step_continuation

DPO_COLUMNS = ("question", "prefix", "step_index", "chosen", "rejected")
SFT_COLUMNS = ("prompt_text", "target_text")
# What a zero-weight micro-step computes on (a rank with no row left while others train): tiny, any tokenizer.
PADDING_ROWS: dict[str, dict[str, Any]] = {
    "dpo": {"question": "0", "prefix": "", "step_index": 1, "chosen": "0", "rejected": "1"},
    "sft": {"prompt_text": "0", "target_text": "1"},
}


# `sequence_ids` of a packed pair row: which sequence(s) a token belongs to, as bits; 0 is padding.
CHOSEN, REJECTED, SHARED = 1, 2, 3


@dataclass(frozen=True)
class Encoded:
    """One sequence: token ids and a 0/1 mask of the tokens whose log-probability counts."""

    input_ids: list[int]
    loss_mask: list[int]
    truncated: bool


def encode_completion(tokenizer: Any, prompt: str, completion: str, *, max_seq_len: int) -> Encoded:
    """`prompt` + `completion` ids, the completion masked in; left-truncates the prompt to fit."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    return _fit(prompt_ids, completion_ids, max_seq_len)


def _fit(prompt_ids: list[int], completion_ids: list[int], max_seq_len: int) -> Encoded:
    truncated = False
    # At least one prompt token must stay: the first completion token is predicted from it.
    if len(completion_ids) > max_seq_len - 1:
        completion_ids = completion_ids[: max_seq_len - 1]
        truncated = True
    room = max_seq_len - len(completion_ids)
    if len(prompt_ids) > room:
        prompt_ids = prompt_ids[len(prompt_ids) - room :]
        truncated = True
    return Encoded(prompt_ids + completion_ids, [0] * len(prompt_ids) + [1] * len(completion_ids), truncated)


def encode_pair(tokenizer: Any, row: dict[str, Any], *, max_seq_len: int) -> tuple[Encoded, Encoded]:
    """(chosen, rejected) sequences of one step pair; both share the prompt of `render_solver_prompt`."""
    prompt = render_solver_prompt(tokenizer, row["question"], row["prefix"], int(row["step_index"]))
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    chosen_ids = tokenizer(step_continuation(row["chosen"]), add_special_tokens=False)["input_ids"]
    rejected_ids = tokenizer(step_continuation(row["rejected"]), add_special_tokens=False)["input_ids"]
    return _fit(prompt_ids, chosen_ids, max_seq_len), _fit(prompt_ids, rejected_ids, max_seq_len)


def pad_batch(rows: list[Encoded], *, pad_token_id: int, pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """Right-pads to the longest row (rounded up to `pad_to_multiple_of`): input_ids, attention_mask, loss_mask."""
    columns = [{"input_ids": r.input_ids, "loss_mask": r.loss_mask} for r in rows]
    return _pad_columns(columns, {"input_ids": pad_token_id, "loss_mask": 0}, pad_to_multiple_of)


def _pad_columns(
    rows: list[dict[str, list[int]]], pads: dict[str, int], pad_to_multiple_of: int
) -> dict[str, torch.Tensor]:
    """Rows of equal-length columns -> [B, T] tensors right-padded with `pads[column]` to the longest row
    (rounded up to `pad_to_multiple_of`), and `attention_mask` 1 on real tokens."""
    if not rows:
        raise ValueError("cannot pad an empty batch")
    length = max(len(r["input_ids"]) for r in rows)
    length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    batch = {key: torch.full((len(rows), length), pad, dtype=torch.long) for key, pad in pads.items()}
    batch["attention_mask"] = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        for key in pads:
            batch[key][i, :n] = torch.tensor(r[key])
        batch["attention_mask"][i, :n] = 1
    return batch


def collate_pairs(
    tokenizer: Any, rows: list[dict[str, Any]], *, max_seq_len: int, pad_to_multiple_of: int = 1
) -> tuple[dict[str, torch.Tensor], int]:
    """B pairs -> one [2B, T] batch (chosen rows 0..B-1, rejected rows B..2B-1, one forward pass for both)
    and the number of truncated sequences."""
    encoded = [encode_pair(tokenizer, row, max_seq_len=max_seq_len) for row in rows]
    sequences = [c for c, _ in encoded] + [r for _, r in encoded]
    batch = pad_batch(sequences, pad_token_id=_pad_id(tokenizer), pad_to_multiple_of=pad_to_multiple_of)
    return batch, sum(s.truncated for s in sequences)


def collate_sft(
    tokenizer: Any, rows: list[dict[str, Any]], *, max_seq_len: int, pad_to_multiple_of: int = 1
) -> tuple[dict[str, torch.Tensor], int]:
    """Rows with `prompt_text`, `target_text` -> a padded batch (loss on target tokens) and truncations.
    The prompt text is used verbatim (already rendered with the chat template by the caller)."""
    sequences = [
        encode_completion(tokenizer, row["prompt_text"], row["target_text"], max_seq_len=max_seq_len) for row in rows
    ]
    batch = pad_batch(sequences, pad_token_id=_pad_id(tokenizer), pad_to_multiple_of=pad_to_multiple_of)
    return batch, sum(s.truncated for s in sequences)


def pack_pair(chosen: Encoded, rejected: Encoded) -> dict[str, list[int]]:
    """One row holding both sequences: input_ids, loss_mask, position_ids, sequence_ids (module docstring).

    The shared part is their common leading tokens, cut one short of the shorter prompt: each rest then
    starts with a prompt token, which is never scored, so every scored token's logits come from the position
    just before it in the row (what `loss.sequence_logps` reads). Prompts truncated differently share
    nothing and are two sequences side by side in one row."""
    limit = min(_prompt_len(chosen), _prompt_len(rejected)) - 1
    shared = 0
    while shared < limit and chosen.input_ids[shared] == rejected.input_ids[shared]:
        shared += 1
    c, r = len(chosen.input_ids), len(rejected.input_ids)
    return {
        "input_ids": chosen.input_ids + rejected.input_ids[shared:],
        "loss_mask": chosen.loss_mask + rejected.loss_mask[shared:],
        "position_ids": [*range(c), *range(shared, r)],
        "sequence_ids": [SHARED] * shared + [CHOSEN] * (c - shared) + [REJECTED] * (r - shared),
    }


def _prompt_len(sequence: Encoded) -> int:
    return sequence.loss_mask.index(1) if 1 in sequence.loss_mask else len(sequence.loss_mask)


def collate_shared_pairs(
    tokenizer: Any, rows: list[dict[str, Any]], *, max_seq_len: int, pad_to_multiple_of: int = 1
) -> tuple[dict[str, torch.Tensor], int]:
    """B pairs -> one [B, T] batch of packed rows (`pack_pair`), right-padded, with `attention_mask` 1 on
    real tokens; and the number of truncated sequences (counted as in `collate_pairs`)."""
    encoded = [encode_pair(tokenizer, row, max_seq_len=max_seq_len) for row in rows]
    pads = {"input_ids": _pad_id(tokenizer), "loss_mask": 0, "position_ids": 0, "sequence_ids": 0}
    batch = _pad_columns([pack_pair(c, r) for c, r in encoded], pads, pad_to_multiple_of)
    return batch, sum(s.truncated for pair in encoded for s in pair)


def pair_attention_mask(sequence_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] `sequence_ids` -> the [B, 1, T, T] boolean mask (True: query t attends key s) of packed rows:
    causal, and a token attends a key only if the key belongs to every sequence the token belongs to (the
    shared part sees itself, each rest sees the shared part and itself, nothing sees padding; a padding
    query sees everything before it, so no row of the softmax is empty)."""
    query, key = sequence_ids[:, :, None], sequence_ids[:, None, :]
    length = sequence_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=sequence_ids.device).tril()
    return (causal & ((query & ~key) == 0)).unsqueeze(1)


def sequence_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Real tokens of the batch's sequences: a packed pair row's shared part counts for both of its sequences."""
    shared = (batch["sequence_ids"] == SHARED).sum() if "sequence_ids" in batch else 0
    return batch["attention_mask"].sum() + shared


def _pad_id(tokenizer: Any) -> int:
    # Padded positions are masked out of attention and loss, so any id works when there is no pad token.
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return int(tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0)


def rows_of(batch: Any) -> list[dict[str, Any]]:
    """A Ray Data batch (pyarrow Table, or dict of column arrays) -> list of row dicts."""
    if hasattr(batch, "to_pylist"):
        return batch.to_pylist()
    columns = list(batch)
    size = len(batch[columns[0]]) if columns else 0
    return [{c: _plain(batch[c][i]) for c in columns} for i in range(size)]


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") and getattr(value, "ndim", 1) == 0 else value
