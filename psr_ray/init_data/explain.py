"""Templated explanations for EFT step judgments: which number differs between the two steps and why the
changed one is wrong (recomputed arithmetic where the step states an equation). Pure, no model, no API."""

from __future__ import annotations

import ast
import operator
import re

# `lhs = rhs` where lhs is plain arithmetic (`48/2`, `$12 x 5`, `(3 + 4) * 2`) and rhs a number.
_EQUATION = re.compile(r"(?P<lhs>[\d$(][\d\s.,+\-*/x×÷()$]*?[\d)])\s*=\s*\$?(?P<rhs>\d[\d,]*(?:\.\d+)?)")
_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def changed_number(good: str, bad: str) -> tuple[str, str, int]:
    """(right number, wrong number, offset) of the one integer `labelled.corrupt_one_number` changed.
    Digit runs before it are identical, so it is the first run that differs and starts at the same offset."""
    for g, b in zip(re.finditer(r"\d+", good), re.finditer(r"\d+", bad), strict=False):
        if g.group() != b.group():
            assert g.start() == b.start(), (good, bad)
            return g.group(), b.group(), b.start()
    raise ValueError(f"steps differ in no number: {good!r} vs {bad!r}")


def evaluate(expression: str) -> float | None:
    """Value of plain arithmetic with at least one operator (`$12 x 5` -> 60.0); None for anything else."""
    text = expression.replace("$", "").replace(",", "").replace("×", "*").replace("x", "*").replace("÷", "/")
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except SyntaxError:
        return None
    if not isinstance(tree, ast.BinOp):
        return None
    try:
        return _value(tree)
    except (ValueError, ZeroDivisionError):
        return None


def _value(node: ast.AST) -> float:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return float(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_value(node.operand)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_value(node.left), _value(node.right))
    raise ValueError("not plain arithmetic")


def _equation_at(step: str, offset: int) -> tuple[str, float, float] | None:
    """(lhs, its value, stated rhs) of the equation in `step` that contains `offset`, if it computes."""
    for match in _EQUATION.finditer(step):
        if match.start() <= offset < match.end():
            value = evaluate(match.group("lhs"))
            if value is None:
                return None
            return " ".join(match.group("lhs").split()), value, float(match.group("rhs").replace(",", ""))
    return None


def _holds(value: float, stated: float) -> bool:
    return abs(value - stated) <= 1e-6 * max(1.0, abs(stated))


def format_number(value: float) -> str:
    return str(int(round(value))) if _holds(value, round(value)) else f"{value:.4f}".rstrip("0").rstrip(".")


def explain(question: str, prefix: str, good: str, bad: str, *, good_letter: str) -> str:
    """Why step `good_letter` (the reference step) beats the other (the same step with one number changed)."""
    bad_letter = "B" if good_letter == "A" else "A"
    right, wrong, offset = changed_number(good, bad)
    number = {good_letter: right, bad_letter: wrong}
    head = f"The steps differ in one number: Step A has {number['A']} where Step B has {number['B']}."
    good_eq, bad_eq = _equation_at(good, offset), _equation_at(bad, offset)
    if good_eq and bad_eq and _holds(good_eq[1], good_eq[2]) and not _holds(bad_eq[1], bad_eq[2]):
        lhs, value, stated = bad_eq
        why = f"Recomputing Step {bad_letter}: {lhs} = {format_number(value)}, not {format_number(stated)}, so it is wrong."
    elif re.search(rf"(?<![\d.,]){right}(?![.,]?\d)", question):
        why = f"The problem gives {right}, so Step {bad_letter}'s {wrong} is wrong."
    elif re.search(rf"(?<![\d.,]){right}(?![.,]?\d)", prefix):
        why = f"The previous steps give {right}, so Step {bad_letter}'s {wrong} is wrong."
    else:
        why = f"{wrong} does not follow from the problem and the previous steps; the correct value is {right}."
    return f"{head} {why} Step {good_letter} is correct."
