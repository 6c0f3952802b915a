"""Worked solutions re-segmented into the paper's step format without changing their content. Pure.

GSM8K (`... #### N`): one step per line of the worked solution, `<<a*b=c>>` calculator annotations removed
(`labelled.solution_steps`, the same steps the labelled judge pairs use), then a last step `\\boxed{N}`.
MATH-style (a solution holding `\\boxed{...}`): paragraphs, then sentences outside math, as steps; whatever
follows the step with the last `\\boxed{}` joins it, so the boxed answer is always in the last step.
"""

from __future__ import annotations

import re
from typing import Any

from psr_ray.core.steps import extract_boxed
from psr_ray.data.problems import gsm8k_final_answer, question_of
from psr_ray.init_data.labelled import solution_steps

# Math spans whose sentence ends ("x = 2. Then") must not split a step: `$$..$$`, `$..$`, `\[..\]`, `\(..\)`.
_MATH_SPAN = re.compile(r"\$\$.*?\$\$|\$.*?\$|\\\[.*?\\\]|\\\(.*?\\\)", re.DOTALL)
# A sentence end: `.`, `!` or `?`, whitespace, then a capital letter opening the next sentence.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def gsm8k_steps(answer: str) -> list[str] | None:
    """Steps of a GSM8K `answer` (`lines ... #### N`): its lines without annotations, then `\\boxed{N}`.
    None when there is no `#### N`."""
    final = gsm8k_final_answer(answer)
    if final is None:
        return None
    return [*solution_steps(answer), f"\\boxed{{{final}}}"]


def math_steps(solution: str) -> list[str] | None:
    """Steps of a MATH-style `solution`: paragraphs split into sentences (never inside math or braces);
    the step with the last `\\boxed{}` absorbs everything after it. None without a `\\boxed{}`."""
    if extract_boxed(solution) is None:
        return None
    steps = [s for paragraph in re.split(r"\n[ \t]*\n", solution.strip()) for s in _sentences(paragraph)]
    last = max(i for i, step in enumerate(steps) if extract_boxed(step) is not None)
    return steps[:last] + [" ".join(steps[last:])]


def _sentences(paragraph: str) -> list[str]:
    # Mask math spans and braced groups so a period inside them cannot end a sentence.
    masked = _MATH_SPAN.sub(lambda m: "_" * len(m.group()), paragraph)
    masked = _mask_braces(masked)
    cuts = [m.start() for m in _SENTENCE_END.finditer(masked)]
    bounds = [0, *cuts, len(paragraph)]
    parts = [paragraph[bounds[i] : bounds[i + 1]].strip() for i in range(len(bounds) - 1)]
    return [p for p in parts if p]


def _mask_braces(text: str) -> str:
    out, depth = [], 0
    for ch in text:
        depth += {"{": 1, "}": -1}.get(ch, 0)
        out.append("_" if depth > 0 or ch == "}" else ch)
    return "".join(out)


def worked_solution(row: dict[str, Any]) -> tuple[str, list[str], str] | None:
    """(question, steps, gold answer) of a row with a worked solution, or None.

    Rows with `steps` (a list of step texts, the built-in task's) and an `answer` are taken as segmented.
    GSM8K rows: `answer` holding `#### N`; MATH rows: `solution` (or a worked `answer`) holding `\\boxed{}`.
    A bare final answer (`\\boxed{5}` alone, MATH-500's `answer`) is not a worked solution."""
    fields = {str(k).lower(): v for k, v in row.items()}
    question = question_of(fields)
    if question is None or not question.strip():
        return None
    steps = fields.get("steps")
    if isinstance(steps, (list, tuple)) and steps and all(isinstance(s, str) and s.strip() for s in steps):
        answer = fields.get("answer")
        if isinstance(answer, (str, int)) and str(answer).strip():
            return question.strip(), [s.strip() for s in steps], str(answer).strip()
    for key in ("solution", "answer"):
        text = fields.get(key)
        if not isinstance(text, str):
            continue
        if "####" in text:
            steps, answer = gsm8k_steps(text), gsm8k_final_answer(text)
        else:
            steps, answer = math_steps(text), extract_boxed(text)
        # A solution that is only its boxed answer teaches no steps.
        worked = text.replace(f"\\boxed{{{answer}}}", "").strip(" $.\n")
        if steps and answer and worked:
            return question.strip(), steps, answer
    return None
