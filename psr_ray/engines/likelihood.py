"""The likelihood judge's inputs and reading (`judge.mode: likelihood`): a candidate step's log-probability under
the solver prompt that proposed it. Pure: the engine actor passes its tokenizer and vLLM's prompt log-probs.

The scored sequence is the proposer's prompt (`render_solver_prompt`, ending in the `Step k:` header) followed by
the step as the proposer wrote it (`step_continuation`: a space, then the step), tokenized apart and joined, so
the step's tokens are exactly the last ones and nothing of the prompt is counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from psr_ray.core import prompts, steps
from psr_ray.engines.api import ScoreRequest


def score_token_ids(tokenizer: Any, request: ScoreRequest) -> tuple[list[int], int]:
    """Token ids of prompt + step, and how many of them (the last ones) are the step's; (ids, 0) for an empty
    step, which has nothing to score."""
    prompt = prompts.render_solver_prompt(tokenizer, request.question, request.prefix, request.step_index)
    ids = tokenizer.encode(prompt, add_special_tokens=False)  # the chat template holds the special tokens
    if not request.step.strip():
        return ids, 0
    step_ids = tokenizer.encode(steps.step_continuation(request.step), add_special_tokens=False)
    return ids + step_ids, len(step_ids)


def step_logprob(prompt_logprobs: Sequence[Any], token_ids: Sequence[int], num_step_tokens: int) -> float:
    """The sum of the log-probabilities of the last `num_step_tokens` of `token_ids`, read from vLLM's
    `prompt_logprobs` of that prompt (position p: a mapping token id -> Logprob that holds token_ids[p])."""
    start = len(token_ids) - num_step_tokens
    assert start >= 1, "the first prompt token has no log-probability"
    return sum(prompt_logprobs[p][token_ids[p]].logprob for p in range(start, len(token_ids)))
