"""The oracle as a judge (the `judge.mode: oracle` ablation) and as a labeller of candidate steps. Pure.

An oracle verdict compares the exact check of both steps: the right one wins with probability 1; two right or
two wrong steps are a draw (verdict "draw", p = 0.5: half a win each, as identical candidates get), so the
step's scores tie exactly where the oracle sees no difference. (Counted as no vote, as an unparseable verdict
is, two copies of one wrong step outscored the other wrong ones and made wrong-vs-wrong pairs.) A round of
wrong steps only rolls back (the paper's dead end); a round of right steps only advances without a pair
(`ProblemSearch.on_judgments(all_right=)`).
"""

from __future__ import annotations

from collections.abc import Sequence

from psr_ray.core.steps import split_steps
from psr_ray.data.problems import Problem
from psr_ray.engines.api import JudgeRequest, Judgment
from psr_ray.oracle.exact import check_next_step, has_exact_check

ORACLE_TEXT = "oracle: {a} vs {b}"


def previous_steps(prefix: str) -> list[str]:
    """The steps of a prefix as `join_steps` writes it (no steps for an empty prefix)."""
    return split_steps(prefix) if prefix.strip() else []


def label_steps(problem: Problem, prefix: str, steps: Sequence[str]) -> list[bool]:
    """Oracle labels of candidate `steps` written after `prefix` (exact check; the problem must have one)."""
    if not has_exact_check(problem):
        raise ValueError(f"problem {problem.problem_id} ({problem.source}) has no exact step check; "
                         "label its steps with Monte-Carlo rollouts (psr_ray.oracle.rollouts)")  # fmt: skip
    previous = previous_steps(prefix)
    return [check_next_step(problem, previous, step) for step in steps]


def oracle_judgments(problem: Problem, requests: Sequence[JudgeRequest], *, policy_version: int) -> list[Judgment]:
    """One verdict per request, from the exact check of its two steps (see the module docstring)."""
    return oracle_round(problem, requests, policy_version=policy_version)[0]


def oracle_round(problem: Problem, requests: Sequence[JudgeRequest], *,
                 policy_version: int) -> tuple[list[Judgment], bool]:  # fmt: skip
    """The verdicts of one step's comparisons and whether every step compared is right (a round of right
    steps only is no dead end: the search advances without a pair instead of rolling back)."""
    judgments, all_right = [], bool(requests)
    for request in requests:
        right_a, right_b = label_steps(problem, request.prefix, [request.step_a, request.step_b])
        all_right = all_right and right_a and right_b
        text = ORACLE_TEXT.format(a="right" if right_a else "wrong", b="right" if right_b else "wrong")
        if right_a == right_b:
            judgments.append(Judgment("draw", 0.5, text, 0, policy_version))
        else:
            judgments.append(Judgment("A" if right_a else "B", 1.0 if right_a else 0.0, text, 0, policy_version))
    return judgments, all_right
