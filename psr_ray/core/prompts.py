"""Solver and pairwise step-judge prompts, and the verdict parser. Pure: no tokenizer is imported here;
callers pass theirs (anything with `apply_chat_template` and `chat_template`)."""

from __future__ import annotations

import enum
import math
import re
from typing import Any

from psr_ray.config import JudgeMode
from psr_ray.core.steps import step_header

SOLVER_INSTRUCTION = (
    "Solve the following math problem step by step. Write each step on its own line, starting with "
    '"Step 1:", "Step 2:" and so on. Put the final answer in \\boxed{{}} in the last step.\n\n'
    "Problem: {question}"
)

JUDGE_INSTRUCTION = (
    "Please act as an impartial judge and evaluate two candidate next steps for the partial solution of "
    "the math problem below. Choose the step that is more correct and more useful for reaching the right "
    "final answer. Do not let the order, length or style of the steps influence you. First give a short "
    'explanation, then output your final verdict strictly in this format: "[[A]]" if step A is better, '
    '"[[B]]" if step B is better.\n\n'
    "[Problem]\n{question}\n\n"
    "[Previous steps]\n{previous}\n\n"
    "[Step A]\n{step_a}\n\n"
    "[Step B]\n{step_b}"
)

# Direct mode: the assistant turn is forced to this text and the next token decides (`A` or `B`).
DIRECT_VERDICT_PREFIX = "Verdict: [["
EXPLAIN_VERDICT_PREFIX = "Explanation:"


class Verdict(enum.Enum):
    A = "A"
    B = "B"
    UNPARSEABLE = "unparseable"
    DRAW = "draw"  # a judge that saw no difference (the oracle on two right or two wrong steps): half a win each


def solver_messages(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": SOLVER_INSTRUCTION.format(question=question.strip())}]


def judge_messages(question: str, prefix: str, step_a: str, step_b: str) -> list[dict[str, str]]:
    content = JUDGE_INSTRUCTION.format(
        question=question.strip(),
        previous=prefix.strip() or "(none: the steps below are the first step)",
        step_a=step_a.strip(),
        step_b=step_b.strip(),
    )
    return [{"role": "user", "content": content}]


def render_chat(tokenizer: Any, messages: list[dict[str, str]], assistant_prefix: str = "") -> str:
    """The model's text for `messages` with the assistant turn opened and `assistant_prefix` already in it.
    A tokenizer without a chat template gets a plain `User:` / `Assistant:` layout."""
    if getattr(tokenizer, "chat_template", None):
        head = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        head = "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages) + "Assistant: "
    return head + assistant_prefix


def render_solver_prompt(tokenizer: Any, question: str, prefix: str, step_index: int) -> str:
    """Prompt for step `step_index`: question, the previous steps (`prefix`, as `join_steps` writes them)
    and the opened `Step k:` header, so generation yields only that step (as `steps.step_continuation`)."""
    return render_chat(tokenizer, solver_messages(question), prefix + step_header(step_index))


def render_solution_prompt(tokenizer: Any, question: str) -> str:
    """Prompt for a whole solution at once (evaluation, IFT): the first step header `Step 1:` is forced."""
    return render_solver_prompt(tokenizer, question, "", 1)


def render_judge_prompt(
    tokenizer: Any, question: str, prefix: str, step_a: str, step_b: str, *, mode: JudgeMode
) -> str:
    prefix_text = DIRECT_VERDICT_PREFIX if JudgeMode(mode) is JudgeMode.DIRECT else EXPLAIN_VERDICT_PREFIX
    return render_chat(tokenizer, judge_messages(question, prefix, step_a, step_b), prefix_text)


_VERDICT_TAG = re.compile(r"\[\[\s*([AB])\s*\]\]")


def parse_verdict(text: str) -> Verdict:
    """`[[A]]` or `[[B]]` from a judge's text. Mixed or missing tags are UNPARSEABLE: never a guess."""
    tags = set(_VERDICT_TAG.findall(text))
    if len(tags) == 1:
        return Verdict(tags.pop())
    return Verdict.UNPARSEABLE


def direct_verdict(logprob_a: float | None, logprob_b: float | None) -> tuple[Verdict, float]:
    """Verdict and P(A beats B) from the next-token log-probabilities of `A` and `B` (None: not in the
    returned top-k). Both missing is UNPARSEABLE with p = 0.5."""
    if logprob_a is None and logprob_b is None:
        return Verdict.UNPARSEABLE, 0.5
    la = -math.inf if logprob_a is None else logprob_a
    lb = -math.inf if logprob_b is None else logprob_b
    top = max(la, lb)
    p_a = math.exp(la - top) / (math.exp(la - top) + math.exp(lb - top))
    if p_a == 0.5:
        return Verdict.UNPARSEABLE, 0.5
    return (Verdict.A if p_a > 0.5 else Verdict.B), p_a
