"""Final-answer extraction and equivalence. Pure: math-verify (sympy) is imported on first use.

`is_equivalent` runs in Ray actor threads, where math-verify's `signal.alarm` timeouts raise, so its
timeouts are disabled; instead, answers too long to be a final answer skip the symbolic path (a huge
expression is the only realistic way to stall sympy), and every error counts as "not equivalent".
"""

from __future__ import annotations

import logging
import math
import re

from psr_ray.core.steps import extract_boxed

# Longer answers are compared as strings only: no timeout guards sympy (see the module docstring).
MAX_SYMBOLIC_CHARS = 400

_ANSWER_PHRASE = re.compile(r"(?i)\b(?:the\s+)?(?:final\s+)?answer\s*(?:is|:)\s*:?[ \t]*([^\n]*)")
_STEP_MARKER = re.compile(r"(?i)\bStep\s+\d+\s*[:.]")
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?")
_PLAIN_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")


def extract_answer(text: str) -> str | None:
    """The final answer in a model's text: the last balanced `\\boxed{}`, else what follows the last
    "The answer is" / "answer:", else the last number (step markers ignored). None when there is none."""
    boxed = extract_boxed(text)
    if boxed:
        return boxed
    phrases = [_clean_phrase(m.group(1)) for m in _ANSWER_PHRASE.finditer(text)]
    phrases = [p for p in phrases if p]
    if phrases:
        return phrases[-1]
    numbers = _NUMBER.findall(_STEP_MARKER.sub(" ", text))
    return numbers[-1].replace(",", "") if numbers else None


def _clean_phrase(answer: str) -> str:
    answer = answer.strip().strip("*").strip()
    answer = answer.rstrip(".").strip()
    if len(answer) >= 2 and answer.startswith("$") and answer.endswith("$"):
        answer = answer.strip("$").strip()
    return answer


def is_equivalent(pred: str | None, gold: str | None) -> bool:
    """Whether answer `pred` means the same as `gold` (both answers, not whole solutions). Never raises:
    anything unparseable, including malformed LaTeX, is False. Safe to call from any thread."""
    if pred is None or gold is None:
        return False
    pred_n, gold_n = _normalize(pred), _normalize(gold)
    if not pred_n or not gold_n:
        return False
    if pred_n == gold_n:
        return True
    pred_x, gold_x = _as_number(pred_n), _as_number(gold_n)
    if pred_x is not None and gold_x is not None:
        # Two plain numbers: decided here, sympy would say the same much more slowly.
        return math.isclose(pred_x, gold_x, rel_tol=1e-9, abs_tol=1e-9)
    if max(len(pred_n), len(gold_n)) > MAX_SYMBOLIC_CHARS or not (_balanced(pred_n) and _balanced(gold_n)):
        return False
    return _math_verify(pred_n, gold_n)


def _normalize(answer: str) -> str:
    """Cheap, meaning-preserving clean-up: surrounding `$`, a nested `\\boxed{}`, `\\!`, trailing period."""
    answer = answer.strip()
    boxed = extract_boxed(answer)
    if boxed is not None and answer.startswith(("\\boxed", "\\fbox")):
        answer = boxed
    if len(answer) >= 2 and answer[0] == "$" and answer[-1] == "$":
        answer = answer.strip("$").strip()
    return answer.replace("\\!", "").rstrip(".").strip()


def _as_number(answer: str) -> float | None:
    """`18`, `18.0`, `1,000`, `$18`, `\\$18`, `-.5` as floats; anything else None."""
    text = answer.removeprefix("\\$").removeprefix("$").strip()
    if not _PLAIN_NUMBER.fullmatch(text):
        return None
    return float(text.replace(",", ""))


def _balanced(text: str) -> bool:
    depth = 0
    for ch in text.replace("\\{", "").replace("\\}", ""):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth < 0:
            return False
    return depth == 0


_MATH_VERIFY = None


def _load_math_verify():
    global _MATH_VERIFY
    if _MATH_VERIFY is None:
        from math_verify import parse, verify

        # It warns once that timeouts are off; that is deliberate here (see the module docstring).
        logging.getLogger("math_verify").setLevel(logging.ERROR)
        _MATH_VERIFY = (parse, verify)
    return _MATH_VERIFY


def _math_verify(pred: str, gold: str) -> bool:
    try:
        parse, verify = _load_math_verify()
        # Boxing tells math-verify's extractor that the whole string is the answer, LaTeX or not.
        gold_parsed = parse(f"\\boxed{{{gold}}}", parsing_timeout=None)
        pred_parsed = parse(f"\\boxed{{{pred}}}", parsing_timeout=None)
        if not gold_parsed or not pred_parsed:
            return False
        return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))
    except Exception:  # math-verify/sympy raise many types on odd input; a crash must not end a run
        return False
