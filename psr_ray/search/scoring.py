"""Scoring one step's candidates from pairwise judgments (PSR, arXiv 2503.03746, section 3.3). Pure.

Candidate i scores the comparisons it wins: ``Score_i = sum_{j != i} votes[i][j]``; the best continues the
solution and (best, worst) becomes the step's pair. Rules the paper leaves open are listed in
`psr_ray.search.problem`'s docstring.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NamedTuple

from psr_ray.core.prompts import Verdict
from psr_ray.engines.api import Judgment


@dataclass(frozen=True)
class StepScores:
    """The judged round of one step: votes[i][j] = wins of i over j summed over the orders judged."""

    votes: list[list[float]]
    soft: list[float]
    num_judgments: int
    num_unparseable: int

    @property
    def scores(self) -> list[float]:
        return [sum(row) for row in self.votes]


def judge_plan(candidates: tuple[str, ...] | list[str], *, both_orders: bool) -> list[tuple[int, int]]:
    """(a, b) candidate indices to send to the judge, `a` shown first. Identical or empty candidates are
    decided without the judge (see `auto_votes`)."""
    plan = []
    num_pairs = 0
    for i in range(len(candidates)):
        for j in range(i + 1, len(candidates)):
            if _auto_decided(candidates[i], candidates[j]):
                continue
            if both_orders:
                plan += [(i, j), (j, i)]
            else:
                plan.append((i, j) if num_pairs % 2 == 0 else (j, i))
            num_pairs += 1
    return plan


def _auto_decided(a: str, b: str) -> bool:
    return a.strip() == b.strip() or not a.strip() or not b.strip()


def score_step(
    candidates: tuple[str, ...] | list[str],
    plan: list[tuple[int, int]],
    judgments: list[Judgment],
    *,
    both_orders: bool,
    soft_votes: bool = False,
) -> StepScores:
    """Vote matrix, soft votes and counts from the judgments of `plan` plus the auto-decided pairs.
    `soft_votes` (direct mode): a parsed comparison votes its probability instead of a whole win."""
    if len(plan) != len(judgments):
        raise ValueError(f"got {len(judgments)} judgments for {len(plan)} comparisons")
    n = len(candidates)
    votes = [[0.0] * n for _ in range(n)]
    soft = [0.0] * n
    orders = 2 if both_orders else 1
    for i in range(n):
        for j in range(i + 1, n):
            text_i, text_j = candidates[i].strip(), candidates[j].strip()
            if text_i == text_j:
                win_i = 0.5  # a draw: identical or both empty
            elif not text_i or not text_j:
                win_i = 0.0 if not text_i else 1.0
            else:
                continue
            votes[i][j] += orders * win_i
            votes[j][i] += orders * (1.0 - win_i)
            soft[i] += orders * win_i
            soft[j] += orders * (1.0 - win_i)
    num_unparseable = 0
    for (a, b), judgment in zip(plan, judgments, strict=True):
        num_unparseable += add_vote(votes, soft, a, b, judgment, soft_votes=soft_votes)
    return StepScores(votes, soft, len(plan), num_unparseable)


def add_vote(
    votes: list[list[float]],
    soft: list[float],
    a: int,
    b: int,
    judgment: Judgment,
    *,
    soft_votes: bool,
    position_bias: float = 0.0,
) -> bool:
    """Adds one judgment of `a` (shown first) vs `b` to `votes` and `soft`; True when it was unparseable.
    `position_bias` (soft votes only) is subtracted from P(A): see `psr_ray.search.plans` for why."""
    verdict = Verdict(judgment.verdict)
    soft[a] += judgment.prob_a
    soft[b] += 1.0 - judgment.prob_a
    if verdict is Verdict.UNPARSEABLE:
        return True
    if verdict is Verdict.DRAW:  # as identical candidates are: a draw, not a failed judgment that votes nothing
        votes[a][b] += 0.5
        votes[b][a] += 0.5
        return False
    if soft_votes:
        prob_a = min(1.0, max(0.0, judgment.prob_a - position_bias))
        votes[a][b] += prob_a
        votes[b][a] += 1.0 - prob_a
    elif verdict is Verdict.A:
        votes[a][b] += 1.0
    else:
        votes[b][a] += 1.0
    return False


class Decision(enum.Enum):
    PAIR = "pair"  # the best beat the worst rejectable candidate by at least the minimum margin
    NO_PAIR = "no_pair"  # every non-empty candidate is the best's text: advance, nothing to prefer
    TIE = "tie"  # no preference among the candidates that could be rejected (or only empty ones): roll back


class StepDecision(NamedTuple):
    decision: Decision
    best: int
    worst: int | None  # the rejected candidate of a PAIR (also reported for a TIE when one exists)
    margin: float  # scores[best] - scores[worst]; 0.0 without a worst


# Soft votes are sums of floats: a margin that is the minimum in exact arithmetic must not fall just below it.
MARGIN_TOLERANCE = 1e-9


def decide_step(
    candidates: tuple[str, ...] | list[str], result: StepScores, *, min_score_margin: float
) -> StepDecision:
    """What the judged round of one step decides. The best candidate (highest score, then soft votes, then
    lowest index) continues. Only non-empty candidates whose text differs from the best can be rejected; the
    worst of them (lowest score, then soft votes, then highest index) is the rejected step when the best beat
    it by `min_score_margin` or more. Below that the round is a tie: the paper's rule (all scores equal: roll
    back) decided over the candidates that could be rejected, so an empty candidate that lost every comparison
    cannot hide a tie among the others."""
    scores = result.scores
    n = len(candidates)
    if n < 2:
        return StepDecision(Decision.TIE, 0, None, 0.0)
    best = max(range(n), key=lambda i: (scores[i], result.soft[i], -i))
    chosen = candidates[best].strip()
    if not chosen:  # every candidate is empty
        return StepDecision(Decision.TIE, best, None, 0.0)
    rejectable = [i for i in range(n) if candidates[i].strip() and candidates[i].strip() != chosen]
    if not rejectable:
        return StepDecision(Decision.NO_PAIR, best, None, 0.0)
    worst = min(rejectable, key=lambda i: (scores[i], result.soft[i], -i))
    margin = scores[best] - scores[worst]
    decision = Decision.PAIR if margin >= min_score_margin - MARGIN_TOLERANCE else Decision.TIE
    return StepDecision(decision, best, worst, margin)
