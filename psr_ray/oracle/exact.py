"""The exact step check of the built-in arithmetic task (`psr_ray.data.arith`). Pure.

A task's reference steps form a deterministic chain (one operation per step, one sensible next operation),
so "on the reference path" is decidable: step k (0-based) of a solution is correct iff every previous step
is, and
  (a) it states at least one equation `a op b = c` and every equation's arithmetic is right;
  (b) its last equation's result is the reference value of step k (a repeated or skipped step is wrong);
  (c) that equation's operands are numbers of the question or earlier reference values (nothing invented);
  (d) `\\boxed{}` appears iff k is the last step, and then holds the reference answer.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from psr_ray.core.steps import extract_boxed
from psr_ray.data.arith import is_arith_name
from psr_ray.data.problems import Problem

_NUMBER = r"\$?(-?\d+(?:\.\d+)?)"
_EQUATION = re.compile(rf"{_NUMBER}\s*([+\-xX×*/÷])\s*{_NUMBER}\s*=\s*{_NUMBER}")
_INTEGER = re.compile(r"(?<![\d.])\d+(?![\d.])")


def has_exact_check(problem: Problem) -> bool:
    """Whether `problem`'s steps can be checked exactly: it comes from the built-in task and has its steps."""
    return is_arith_name(problem.source) and bool(problem.steps)


def reference_values(problem: Problem) -> list[float]:
    """The value each reference step computes: the result of its last equation."""
    values = []
    for step in problem.steps:
        equations = _EQUATION.findall(step)
        assert equations, f"reference step without an equation: {step!r}"
        values.append(float(equations[-1][3]))
    return values


def _apply(a: float, op: str, b: float) -> float | None:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op in "xX×*":
        return a * b
    return None if b == 0 else a / b


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def step_is_correct(problem: Problem, index: int, step: str, *, values: Sequence[float] | None = None) -> bool:
    """Conditions (a)-(d) of the module docstring for step `index` (0-based) alone, previous steps assumed
    right. `values` are `reference_values(problem)`, passed in when checking many steps."""
    return why_wrong(problem, index, step, values=values) is None


def why_wrong(problem: Problem, index: int, step: str, *, values: Sequence[float] | None = None) -> str | None:
    """Why step `index` (previous steps assumed right) breaks a condition of the module docstring, in one
    sentence a judge could write; None when it is right."""
    values = reference_values(problem) if values is None else values
    if index >= len(values):
        return "the solution was already finished"
    equations = _EQUATION.findall(step)
    if not equations:
        return "it computes nothing: it has no equation"
    for a, op, b, c in equations:
        result = _apply(float(a), op, float(b))
        if result is None or abs(result - float(c)) > 1e-9:
            return f"{a} {op} {b} is not {c}" + ("" if result is None else f" but {_format(result)}")
    a, op, b, c = equations[-1]
    available = {float(x) for x in _INTEGER.findall(problem.question)} | set(values[:index])
    invented = [x for x in (a, b) if float(x) not in available]
    if invented:
        return f"{invented[0]} is neither a number of the problem nor a result of the previous steps"
    if float(c) != values[index]:
        if float(c) in values[:index]:
            return "it repeats a result of the previous steps instead of taking the next one"
        return f"{a} {op} {b} is not the operation the problem asks for next"
    boxed = extract_boxed(step)
    if index == len(values) - 1:
        if boxed is None:
            return "it is the last step but gives no final answer in \\boxed{}"
        if _number(boxed) != _number(problem.answer or ""):
            return f"its final answer {boxed} is not the result it computed"
        return None
    return "it gives a final answer before the last step" if boxed is not None else None


def _format(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def check_steps(problem: Problem, steps: Sequence[str]) -> list[bool]:
    """Per step: correct and every step before it correct (a solution off the reference path stays off)."""
    values = reference_values(problem)
    out, on_path = [], True
    for index, step in enumerate(steps):
        on_path = on_path and step_is_correct(problem, index, step, values=values)
        out.append(on_path)
    return out


def check_next_step(problem: Problem, previous: Sequence[str], step: str) -> bool:
    """Whether `step`, written after the steps `previous`, keeps the solution on the reference path."""
    return check_steps(problem, [*previous, step])[-1]


def recompute(step: str) -> str | None:
    """What a judge can check by redoing a step's last equation: `4 x 11 = 44, it writes 54`; None without
    an equation. (EFT explanations recompute first and compare after, the order a model can generate.)"""
    equations = _EQUATION.findall(step)
    if not equations:
        return None
    a, op, b, c = equations[-1]
    result = _apply(float(a), op, float(b))
    return f"{a} {op} {b} = {'undefined' if result is None else _format(result)}, it writes {c}"
