"""Judge plans: which comparisons one step's judge rounds ask for, and what they decide (`judge.plan`). Pure.

A plan run is fed one judge round at a time: `requests` lists the current round's comparisons (a, b), `a`
shown first; `feed(judgments)` records them and opens the next round, or marks the run `done`; `decide()`
then gives the step's scores and decision (`psr_ray.search.scoring.StepDecision`).

- `round_robin` (the paper's): one round of every pair of distinct non-empty candidates, in both orders by
  default: N(N-1) calls for N = 6 is 30. Scored and decided exactly as `score_step`/`decide_step` say.
- `knockout`: at most 2(m-1) calls, m the number of distinct non-empty texts (m <= N; 10 for N = 6).
  Round 1 pairs the distinct texts in index order (0 vs 1, 2 vs 3, ...) in both orders (when
  `judge.both_orders`). Its winners play a knockout for best, its losers one for worst, one order per
  match, which candidate goes first alternating from match to match; both brackets' matches of a round travel
  together. With m odd the last text has a bye into both brackets (still 2(m-1) calls); should it win both
  (the judge was inconsistent about it) it is the best and the other finalist of the losers bracket the worst.
  A match is won by more votes (ties: the lower index is better). Rounds: 1 + ceil(log2(ceil(m/2))), 3 for 6.

Rules of `knockout`, decided here:
- Position bias. In direct mode (soft votes) a one-order comparison of SmolLM2-135M says `A` 98% of the time
  (bench/results/judge_accuracy.md), so the first-shown candidate would win every later match. The bias is
  measured on the step's own first round, whose matches are judged in both orders: for a judge without a
  preference P(a | a first) + P(b | b first) = 1, so the mean of (P(a | a first) + P(b | b first) - 1) / 2 is
  the step's position bias, subtracted from P(A) in the later rounds. Round 1's votes cancel it by
  themselves (in both orders the sum of a match's votes is unchanged). Hard votes (explain mode) and runs with
  `both_orders: false` are not corrected.
- Ties (`search.min_score_margin`). Scores are put on round robin's scale so the same margin means the same:
  a candidate's votes per call it took part in (its win rate), times the (m-1) x orders calls each candidate
  takes in round robin. The step is a tie (roll back) when the best's score minus the worst's is below the
  margin; with a judge that sees no difference every rate is about 1/2 and the step ties as in round robin.
- Identical and empty candidates are decided without the judge as in round robin: duplicates share the score
  of their text's first candidate, empty ones score 0 and are never picked.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from psr_ray.config import JudgePlan
from psr_ray.engines.api import Judgment
from psr_ray.search.scoring import (
    MARGIN_TOLERANCE,
    Decision,
    StepDecision,
    StepScores,
    add_vote,
    decide_step,
    judge_plan,
    score_step,
)


class PlanResult(NamedTuple):
    votes: StepScores  # the vote matrix of the comparisons made, soft votes and counts
    scores: list[float]  # per candidate: what the plan ranks by (round robin: votes won)
    decision: StepDecision


def max_calls(plan: JudgePlan, num_candidates: int, *, both_orders: bool) -> int:
    """Judge calls of one step at most (all candidates distinct)."""
    n = num_candidates
    if plan is JudgePlan.ROUND_ROBIN:
        return n * (n - 1) // (1 if both_orders else 2)
    # The first round's n // 2 matches, then a knockout in each bracket of ceil(n / 2) candidates.
    return n // 2 * (2 if both_orders else 1) + 2 * (math.ceil(n / 2) - 1)


def first_round_calls(plan: JudgePlan, num_candidates: int, *, both_orders: bool) -> int:
    """Judge calls of a step's first (largest) round: what one problem adds to a judge batch at most."""
    if plan is JudgePlan.ROUND_ROBIN:
        return max_calls(plan, num_candidates, both_orders=both_orders)
    return num_candidates // 2 * (2 if both_orders else 1)


class RoundRobinRun:
    """The paper's plan: one round of every pair (`scoring.judge_plan`)."""

    def __init__(self, candidates: tuple[str, ...] | list[str], *, both_orders: bool, soft_votes: bool) -> None:
        self.candidates, self.both_orders, self.soft_votes = list(candidates), both_orders, soft_votes
        self.requests = judge_plan(self.candidates, both_orders=both_orders)
        self.done = False
        self._votes: StepScores | None = None

    def feed(self, judgments: list[Judgment]) -> None:
        assert not self.done
        self._votes = score_step(
            self.candidates, self.requests, judgments, both_orders=self.both_orders, soft_votes=self.soft_votes
        )
        self.requests, self.done = [], True

    def decide(self, *, min_score_margin: float) -> PlanResult:
        assert self._votes is not None
        decision = decide_step(self.candidates, self._votes, min_score_margin=min_score_margin)
        return PlanResult(self._votes, self._votes.scores, decision)


class KnockoutRun:
    """Knockouts for best and worst after a shared first round (see the module docstring)."""

    def __init__(self, candidates: tuple[str, ...] | list[str], *, both_orders: bool, soft_votes: bool) -> None:
        self.candidates, self.both_orders, self.soft_votes = list(candidates), both_orders, soft_votes
        n = len(self.candidates)
        texts = [c.strip() for c in self.candidates]
        first: dict[str, int] = {}
        for i, text in enumerate(texts):
            if text:
                first.setdefault(text, i)
        self.distinct = list(first.values())
        self._rep = [first.get(text, -1) for text in texts]  # the first candidate of each text; -1: empty
        self.votes = [[0.0] * n for _ in range(n)]
        self.soft = [0.0] * n
        self.calls = [0] * n
        self.num_judgments = self.num_unparseable = 0
        self.position_bias = 0.0
        self.num_rounds = 0
        self.done = False
        self._num_single = 0  # one-order matches so far: which candidate goes first alternates
        self._first_round = True
        self._best_bracket: list[int] = []
        self._worst_bracket: list[int] = []
        self._worst_final: tuple[int, int] | None = None
        self._matches: list[tuple[int, int]] = []
        self.requests: list[tuple[int, int]] = []
        m = len(self.distinct)
        if m >= 2:
            self._matches = list(zip(self.distinct[: m - 1 : 2], self.distinct[1::2], strict=True))
            for k, (a, b) in enumerate(self._matches):
                if both_orders:
                    self.requests += [(a, b), (b, a)]
                else:
                    self.requests.append((a, b) if k % 2 == 0 else (b, a))

    def feed(self, judgments: list[Judgment]) -> None:
        assert not self.done
        if len(judgments) != len(self.requests):
            raise ValueError(f"got {len(judgments)} judgments for {len(self.requests)} comparisons")
        bias = 0.0 if self._first_round else self.position_bias
        for (a, b), judgment in zip(self.requests, judgments, strict=True):
            self.num_unparseable += add_vote(
                self.votes, self.soft, a, b, judgment, soft_votes=self.soft_votes, position_bias=bias
            )
            self.calls[a] += 1
            self.calls[b] += 1
        self.num_judgments += len(judgments)
        self.num_rounds += bool(judgments)
        if self._first_round:
            self._after_first_round(judgments)
        else:
            self._best_bracket = self._advance(self._best_bracket, better=True)
            self._worst_bracket = self._advance(self._worst_bracket, better=False)
        self._first_round = False
        self._next_round()

    def _after_first_round(self, judgments: list[Judgment]) -> None:
        if self.soft_votes and self.both_orders and self._matches:
            # requests are (a, b), (b, a) per match: P(a | a first) + P(b | b first) - 1 is twice the bias.
            probs = [j.prob_a for j in judgments]
            self.position_bias = sum(probs[k] + probs[k + 1] - 1.0 for k in range(0, len(probs), 2)) / len(probs)
        for a, b in self._matches:
            winner = self._winner(a, b)
            self._best_bracket.append(winner)
            self._worst_bracket.append(b if winner == a else a)
        if len(self.distinct) % 2 == 1 and len(self.distinct) > 1:
            self._best_bracket.append(self.distinct[-1])
            self._worst_bracket.append(self.distinct[-1])

    def _winner(self, a: int, b: int) -> int:
        if self.votes[a][b] != self.votes[b][a]:
            return a if self.votes[a][b] > self.votes[b][a] else b
        return min(a, b)

    def _advance(self, bracket: list[int], *, better: bool) -> list[int]:
        """The bracket's survivors after its matches of the round just fed (a bye stays)."""
        survivors = []
        for k in range(0, len(bracket) - 1, 2):
            a, b = bracket[k], bracket[k + 1]
            winner = self._winner(a, b)
            survivors.append(winner if better else (b if winner == a else a))
            if not better and len(bracket) == 2:
                self._worst_final = (a, b)
        if len(bracket) % 2 == 1:
            survivors.append(bracket[-1])
        return survivors

    def _next_round(self) -> None:
        self.requests = []
        for bracket in (self._best_bracket, self._worst_bracket):
            for k in range(0, len(bracket) - 1, 2):
                a, b = bracket[k], bracket[k + 1]
                self.requests.append((a, b) if self._num_single % 2 == 0 else (b, a))
                self._num_single += 1
        self.done = not self.requests

    def scores(self) -> list[float]:
        """Win rate per call on round robin's scale (module docstring); duplicates share their text's."""
        orders = 2 if self.both_orders else 1
        scale = (len(self.distinct) - 1) * orders
        rate = [sum(row) / c if c else 0.0 for row, c in zip(self.votes, self.calls, strict=True)]
        return [rate[r] * scale if r >= 0 else 0.0 for r in self._rep]

    def decide(self, *, min_score_margin: float) -> PlanResult:
        assert self.done
        votes = StepScores(self.votes, self.soft, self.num_judgments, self.num_unparseable)
        scores = self.scores()
        if not self.distinct:  # every candidate is empty
            return PlanResult(votes, scores, StepDecision(Decision.TIE, 0, None, 0.0))
        if len(self.distinct) == 1:
            return PlanResult(votes, scores, StepDecision(Decision.NO_PAIR, self.distinct[0], None, 0.0))
        (best,), (worst,) = self._best_bracket, self._worst_bracket
        if best == worst:  # the bye won both knockouts
            assert self._worst_final is not None
            worst = next(c for c in self._worst_final if c != best)
        margin = scores[best] - scores[worst]
        decision = Decision.PAIR if margin >= min_score_margin - MARGIN_TOLERANCE else Decision.TIE
        return PlanResult(votes, scores, StepDecision(decision, best, worst, margin))


def start_plan(
    plan: JudgePlan, candidates: tuple[str, ...] | list[str], *, both_orders: bool, soft_votes: bool
) -> RoundRobinRun | KnockoutRun:
    """A run of `plan` over one step's candidates; its first round is in `requests`."""
    run_type = RoundRobinRun if JudgePlan(plan) is JudgePlan.ROUND_ROBIN else KnockoutRun
    return run_type(candidates, both_orders=both_orders, soft_votes=soft_votes)


def num_rounds(num_distinct: int) -> int:
    """Judge rounds of a knockout over `num_distinct` distinct texts (0 or 1 text: none)."""
    return 0 if num_distinct < 2 else 1 + math.ceil(math.log2(math.ceil(num_distinct / 2)))
