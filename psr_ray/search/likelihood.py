"""The likelihood self-judge (`judge.mode: likelihood`, an ablation): one step's candidates ranked by the policy's
own log-probability of each under the solver prompt that proposed it. Pure.

No judge prompt and no oracle: one prefill per distinct non-empty candidate (N per step instead of round robin's
N(N-1) comparisons), each scored by `StepLikelihood.score` (mean log-probability per step token). The best (the
highest score) continues the solution and (best, worst) becomes the step's pair, as with pairwise scores; the
pair records these scores (chosen_score, rejected_score, candidate_scores, margin in nats per token).

Rules, decided here:
- Identical candidates are scored once and share the score; empty candidates are not scored (score -inf) and are
  never picked, as in the pairwise plans. A candidate the engine could not score (its prompt does not fit the
  context: 0 tokens) is treated like an empty one and counted as unparseable.
- Ties: the best is the lowest index among the highest scores, the worst the highest index among the lowest
  scores of the candidates that can be rejected (scored, text unlike the best's). The round is a tie (roll back)
  only when the best and the worst score exactly the same: the paper's rule (all scores equal). The pairwise
  `search.min_score_margin` counts comparisons won and does not apply: two different texts almost never have
  equal likelihoods, so this judge rarely rolls back.
- vote_matrix[i][j] is 1 when i scores higher than j, 0.5 when equal, else 0 (which of the two the likelihood
  prefers), so a recorded pair reads like a pairwise one.
"""

from __future__ import annotations

import math

from psr_ray.engines.api import StepLikelihood
from psr_ray.search.plans import PlanResult
from psr_ray.search.scoring import Decision, StepDecision, StepScores


class LikelihoodRun:
    """One round: every distinct non-empty candidate text scored once (`requests` are candidate indices)."""

    def __init__(self, candidates: tuple[str, ...] | list[str]) -> None:
        self.candidates = list(candidates)
        first: dict[str, int] = {}
        for i, text in enumerate(c.strip() for c in self.candidates):
            if text:
                first.setdefault(text, i)
        self._rep = [first.get(c.strip(), -1) for c in self.candidates]  # the first candidate of each text; -1: empty
        self.requests: list[int] = list(first.values())
        self.done = False
        self._likelihoods: dict[int, StepLikelihood] = {}

    def feed(self, likelihoods: list[StepLikelihood]) -> None:
        assert not self.done
        if len(likelihoods) != len(self.requests):
            raise ValueError(f"got {len(likelihoods)} likelihoods for {len(self.requests)} candidates")
        self._likelihoods = dict(zip(self.requests, likelihoods, strict=True))
        self.requests, self.done = [], True

    def scores(self) -> list[float]:
        """Per candidate: its text's mean log-probability per token; -inf when empty or not scored."""
        return [self._likelihoods[r].score if r >= 0 else -math.inf for r in self._rep]

    def decide(self) -> PlanResult:
        """The step's decision from the scores (the module docstring's rules)."""
        assert self.done
        scores, n = self.scores(), len(self.candidates)
        votes = [[0.0 if i == j else 0.5 + 0.5 * ((s > t) - (s < t)) for j, t in enumerate(scores)]
                 for i, s in enumerate(scores)]  # fmt: skip
        num_unscored = sum(1 for x in self._likelihoods.values() if x.num_tokens == 0)
        result = StepScores(votes, list(scores), len(self._likelihoods), num_unscored)
        scored = [i for i in range(n) if scores[i] > -math.inf]
        if not scored:  # every candidate empty or unscorable
            return PlanResult(result, scores, StepDecision(Decision.TIE, 0, None, 0.0))
        best = max(scored, key=lambda i: (scores[i], -i))
        chosen = self.candidates[best].strip()
        rejectable = [i for i in scored if self.candidates[i].strip() != chosen]
        if not rejectable:
            return PlanResult(result, scores, StepDecision(Decision.NO_PAIR, best, None, 0.0))
        worst = min(rejectable, key=lambda i: (scores[i], -i))
        margin = scores[best] - scores[worst]
        decision = Decision.PAIR if margin > 0 else Decision.TIE
        return PlanResult(result, scores, StepDecision(decision, best, worst, margin))
