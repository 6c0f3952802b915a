"""Issue 13a: the search prompt, the step-DPO prompt/completion split, the IFT targets and the evaluation
prompt give exactly the token ids of the same solution written freely, with SmolLM2-135M's real tokenizer
(whose `"Step 2: "` ends in a lone space token while `"Step 2: She"` is `[..., ":", " She"]`)."""

from __future__ import annotations

import pytest

from psr_ray.core.prompts import render_chat, render_solution_prompt, render_solver_prompt, solver_messages
from psr_ray.core.steps import join_steps, step_header
from psr_ray.data.problems import Problem
from psr_ray.init_data.build import ift_rows
from psr_ray.trainer.batches import encode_pair

QUESTION = "Natalia sold clips to 48 of her friends in April, and then she sold half as many in May. How many?"
# Steps opening with a word, a digit, a dollar sign and a parenthesis: each splits differently after ":".
SOLUTION = (
    "She sold 48 clips in April.",
    "48 / 2 = 24 clips were sold in May.",
    "$48 + 24 = 72$ clips in all.",
    "(April and May together) the answer is \\boxed{72}.",
)


@pytest.fixture(scope="module")
def tokenizer(embedded_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_model_dir)


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def free_text(tokenizer, steps: tuple[str, ...]) -> str:
    """The solution as the model writes it after the chat template's assistant header."""
    return render_chat(tokenizer, solver_messages(QUESTION)) + join_steps(steps).rstrip("\n")


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_search_and_dpo_tokens_equal_the_free_solution(tokenizer, k):
    prefix = join_steps(SOLUTION[: k - 1])
    prompt = render_solver_prompt(tokenizer, QUESTION, prefix, k)  # what the rollout engine is sent
    full = ids(tokenizer, free_text(tokenizer, SOLUTION[:k]))
    row = {"question": QUESTION, "prefix": prefix, "step_index": k, "chosen": SOLUTION[k - 1], "rejected": "No."}
    chosen, _ = encode_pair(tokenizer, row, max_seq_len=4096)
    assert chosen.input_ids == full
    # The engine generates the step after the prompt: " She ..." (the space opens the step's first word).
    assert prompt.endswith(step_header(k).rstrip()) and not prompt.endswith(" ")
    assert ids(tokenizer, prompt) + ids(tokenizer, " " + SOLUTION[k - 1]) == full
    # The loss covers exactly the tokens of the step (its leading space belongs to its first word).
    num_step = len(full) - len(ids(tokenizer, prompt))
    assert chosen.loss_mask == [0] * (len(full) - num_step) + [1] * num_step
    assert tokenizer.decode(full[len(full) - num_step :]) == " " + SOLUTION[k - 1]


def test_ift_target_tokens_equal_the_free_solution(tokenizer):
    (row,) = ift_rows(tokenizer, [Problem("p", QUESTION, "72", "gsm8k", SOLUTION)])
    assert row["prompt_text"] == render_solution_prompt(tokenizer, QUESTION)
    assert row["prompt_text"] + row["target_text"] == free_text(tokenizer, SOLUTION) + tokenizer.eos_token
    whole = ids(tokenizer, row["prompt_text"] + row["target_text"])  # the EOS special included
    assert ids(tokenizer, row["prompt_text"]) + ids(tokenizer, row["target_text"]) == whole
    assert whole[-1] == tokenizer.eos_token_id


def test_eval_prompt_opens_step_one_like_the_search(tokenizer):
    assert render_solution_prompt(tokenizer, QUESTION) == render_solver_prompt(tokenizer, QUESTION, "", 1)
    assert render_solution_prompt(tokenizer, QUESTION).endswith("<|im_start|>assistant\nStep 1:")
