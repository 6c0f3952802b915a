"""The step-wise self-judged search of PSR (arXiv 2503.03746, section 3.3) for one problem. Pure: no Ray.

At step k the policy proposes `num_candidates` next steps; the judge compares every unordered pair of
distinct candidates (in both orders by default) and candidate i scores the number of comparisons it wins:
``Score_i = sum_{j != i} votes[i][j]``. The best candidate continues the solution and (best, worst) becomes
a `StepPair` (`judge.plan: knockout` asks fewer comparisons over several judge rounds instead: rules in
`psr_ray.search.plans`). When all scores are equal the judge saw no difference, which the paper reads as a sign that
the previous step was a dead end: that step and its pair are dropped and it is proposed again (a rollback).

Rules the paper leaves open, decided here:
- Identical candidates (after strip) are not sent to the judge; each side gets half a win per order, a draw
  in round-robin scoring. Empty candidates lose to any non-empty one without a judge call (an empty step is
  never a valid step), and are never used as the rejected step (zero tokens carry no DPO signal).
- An unparseable verdict is no vote for either side; it is counted in `num_unparseable`.
- In `direct` judge mode a comparison's vote is its probability: P(A wins) to the first candidate, the rest
  to the second. Judged in both orders, i's votes over j are then P(i | i first) + 1 - P(j | j first), which
  cancels a constant position bias (SmolLM2-135M answers `A` 98% of the time: hard votes in both orders
  would tie every candidate and roll every step back). `explain` keeps the paper's hard wins.
- Ties for best are broken by the soft votes (sum of P(win) from `prob_a`), then by the lowest index; ties
  for worst by the lowest soft votes, then by the highest index.
- A tie is decided over the candidates that can be rejected (non-empty, text unlike the best's): the best
  must beat the worst of them by `min_score_margin` (score units: one comparison won is 1). Below that the
  round is a tie and rolls back. Exact equality would never fire with soft votes (margins like 4.03 vs 3.95
  are judge noise), and an empty candidate, which loses everything, would hide a tie among the others.
  Every pair stores its margin.
- When every non-empty candidate is the same text the step advances without a pair: the policy agrees with
  itself on an easy step, which is no sign that the previous step was a dead end (the paper's literal rule,
  all scores equal, would roll it back).
- A step is committed once the step after it is decided: its pair is released then (`take_commit()`), one
  step's decision time after it was decided, not at the problem's end. A rollback pops only an uncommitted
  step; a tie right above the committed steps proposes that step again (as a tie at step 1 does), so a
  released pair is never retracted (exactly once). A problem abandoned after `max_rollbacks` rollbacks drops
  its uncommitted pair; the released ones stay. Pairs released before the problem's end carry
  `answer_correct = None` (the answer is not known yet); those released at its end carry it.
- A `Checkpoint` is the search's state when its newest committed step was decided (steps, proposals and
  rollbacks so far): a search resumed from it after a crash proposes exactly what the lost one proposed next
  (the same seeds), and never writes a released pair_id again.
- With one order per pair, which candidate is shown first alternates from pair to pair to spread position
  bias over the candidates.
- `judge.mode: likelihood` (an ablation) asks no comparisons: the round scores each candidate once by the
  policy's own log-probability of it (`score_requests()` -> engines -> `on_likelihoods()`; rules in
  `psr_ray.search.likelihood`).
"""

from __future__ import annotations

import dataclasses
import enum

from psr_ray.config import JudgeMode, JudgePlan
from psr_ray.core.steps import is_final_step, join_steps
from psr_ray.core.verify import extract_answer, is_equivalent
from psr_ray.data.problems import Problem
from psr_ray.data.schema import Checkpoint, StepPair
from psr_ray.engines.api import Candidates, JudgeRequest, Judgment, ProposeRequest, ScoreRequest, StepLikelihood
from psr_ray.search.likelihood import LikelihoodRun
from psr_ray.search.plans import KnockoutRun, PlanResult, RoundRobinRun, start_plan
from psr_ray.search.scoring import Decision


class Phase(enum.Enum):
    PROPOSE = "propose"
    JUDGE = "judge"
    DONE = "done"


class Outcome(enum.Enum):
    FINAL_ANSWER = "final_answer"
    MAX_STEPS = "max_steps"
    ABANDONED = "abandoned"


class ProblemSearch:
    """The search of one problem as a state machine driven by a scheduler:
    PROPOSE: `propose_request()` -> engine -> `on_candidates()`;
    JUDGE: `judge_requests()` -> judges -> `on_judgments()` (judge.mode=likelihood: `score_requests()` ->
    engines -> `on_likelihoods()`); `take_commit()` after every round until DONE, then `finished_pairs()`.
    """

    def __init__(
        self,
        problem: Problem,
        *,
        iteration: int,
        max_steps: int,
        max_rollbacks: int,
        both_orders: bool = True,
        judge_mode: JudgeMode = JudgeMode.EXPLAIN,
        min_score_margin: float = 1.0,
        judge_plan: JudgePlan = JudgePlan.ROUND_ROBIN,
        resume_from: Checkpoint | None = None,
    ) -> None:
        self.problem = problem
        self.iteration = iteration
        self.max_steps = max_steps
        self.max_rollbacks = max_rollbacks
        self.both_orders = both_orders
        self.judge_mode = JudgeMode(judge_mode)
        self.min_score_margin = min_score_margin
        self.judge_plan = JudgePlan(judge_plan)
        start = resume_from or Checkpoint((), 0, 0)
        self.steps: list[str] = list(start.steps)
        self.pairs: list[StepPair | None] = [None] * len(self.steps)  # pairs[k] belongs to steps[k]
        self.phase = Phase.PROPOSE
        self.outcome: Outcome | None = None
        self.num_rollbacks = start.num_rollbacks
        self.num_proposals = start.num_proposals  # accepted proposals: the attempt number of the next one's seed
        self.committed = len(self.steps)  # steps[:committed] can no longer be popped
        self._released = self.committed  # pairs[:_released] were handed out (take_commit / finished_pairs)
        self._decided_at: list[tuple[int, int]] = [(start.num_proposals, start.num_rollbacks)] * self.committed
        # Totals over every round, dropped ones included (for counters).
        self.num_candidates_seen = 0
        self.num_generated_tokens = 0
        self.num_judgments = 0
        self.num_unparseable = 0
        self.num_steps_without_pair = 0  # steps kept that emit no pair (identical candidates), dropped ones included
        self._candidates: Candidates | None = None
        self._run: RoundRobinRun | KnockoutRun | None = None  # the step's judge plan, fed round by round
        self._likelihood: LikelihoodRun | None = None  # judge.mode=likelihood: the step's round instead of a plan
        self._all_right = True  # every round so far said all its candidates are right (judge.mode=oracle)
        self._answer_correct: bool | None = None

    @property
    def step_index(self) -> int:
        """1-based index of the step being searched."""
        return len(self.steps) + 1

    @property
    def prefix(self) -> str:
        return join_steps(self.steps)

    def propose_request(self) -> ProposeRequest:
        assert self.phase is Phase.PROPOSE, self.phase
        return ProposeRequest(self.problem.question, self.prefix, self.step_index)

    def on_candidates(self, candidates: Candidates) -> None:
        assert self.phase is Phase.PROPOSE, self.phase
        self._candidates = candidates
        self.num_proposals += 1
        self.num_candidates_seen += len(candidates.steps)
        self.num_generated_tokens += candidates.num_tokens
        self._all_right = True
        self.phase = Phase.JUDGE
        if self.judge_mode is JudgeMode.LIKELIHOOD:
            self._likelihood = LikelihoodRun(candidates.steps)
            if not self._likelihood.requests:  # every candidate empty: nothing to score
                self.on_likelihoods([])
            return
        self._run = start_plan(
            self.judge_plan, candidates.steps, both_orders=self.both_orders,
            soft_votes=self.judge_mode is JudgeMode.DIRECT,
        )  # fmt: skip
        if not self._run.requests:  # every pair auto-decided: nothing to ask the judge
            self.on_judgments([])

    def judge_requests(self) -> list[JudgeRequest]:
        """The current judge round's comparisons (a plan of several rounds asks again after each)."""
        assert self.phase is Phase.JUDGE and self._candidates is not None and self._run is not None, self.phase
        steps, prefix = self._candidates.steps, self.prefix
        return [JudgeRequest(self.problem.question, prefix, steps[a], steps[b]) for a, b in self._run.requests]

    def score_requests(self) -> list[ScoreRequest]:
        """The step's candidates to score (judge.mode=likelihood): one per distinct non-empty text."""
        assert self.phase is Phase.JUDGE and self._candidates is not None and self._likelihood is not None
        steps, question, prefix = self._candidates.steps, self.problem.question, self.prefix
        return [ScoreRequest(question, prefix, self.step_index, steps[i]) for i in self._likelihood.requests]

    def on_likelihoods(self, likelihoods: list[StepLikelihood]) -> None:
        """The step's round decided by the candidates' likelihoods (`psr_ray.search.likelihood`)."""
        assert self.phase is Phase.JUDGE and self._likelihood is not None, self.phase
        self._likelihood.feed(likelihoods)
        decided = self._likelihood.decide()
        self._likelihood = None
        self._decide_round(decided)

    def on_judgments(self, judgments: list[Judgment], *, all_right: bool = False) -> None:
        """`all_right`: the judge knows every candidate is right (judge.mode=oracle); a tie then advances
        without a pair, as identical candidates do, instead of rolling a right step back. A plan of several
        rounds stays in JUDGE until its last round is fed; `all_right` must then hold for every round."""
        assert self.phase is Phase.JUDGE and self._candidates is not None and self._run is not None, self.phase
        run = self._run
        run.feed(judgments)
        self._all_right = self._all_right and all_right
        if not run.done:
            return  # the plan's next round: judge_requests() lists it
        result, scores, decided = run.decide(min_score_margin=self.min_score_margin)
        self._run = None
        if decided.decision is Decision.TIE and self._all_right:
            decided = decided._replace(decision=Decision.NO_PAIR, worst=None, margin=0.0)
        self._decide_round(PlanResult(result, scores, decided))

    def _decide_round(self, planned: PlanResult) -> None:
        """Rolls back, or keeps the best candidate (and the step's pair), as the round's decision says."""
        assert self._candidates is not None
        cands, (result, scores, decided) = self._candidates, planned
        self.num_judgments += result.num_judgments
        self.num_unparseable += result.num_unparseable
        self._candidates = None
        if decided.decision is Decision.TIE:
            self._rollback()
            return
        best, worst = decided.best, decided.worst
        pair = None
        if decided.decision is Decision.NO_PAIR:
            self.num_steps_without_pair += 1
        else:
            assert worst is not None
            pair = StepPair(
                pair_id=StepPair.make_id(self.iteration, self.problem.problem_id, self.step_index),
                problem_id=self.problem.problem_id,
                iteration=self.iteration,
                step_index=self.step_index,
                question=self.problem.question,
                prefix=self.prefix,
                chosen=cands.steps[best].strip(),
                rejected=cands.steps[worst].strip(),
                chosen_score=scores[best],
                rejected_score=scores[worst],
                margin=decided.margin,
                num_candidates=len(cands.steps),
                candidates=list(cands.steps),
                candidate_scores=scores,
                vote_matrix=result.votes,
                num_judgments=result.num_judgments,
                num_unparseable=result.num_unparseable,
                judge_mode=self.judge_mode.value,
                policy_version=cands.policy_version,
                num_rollbacks=self.num_rollbacks,
                reference_answer=self.problem.answer,
            )
        self.steps.append(cands.steps[best].strip())
        self.pairs.append(pair)
        self._decided_at.append((self.num_proposals, self.num_rollbacks))
        self.committed = max(self.committed, len(self.steps) - 1)  # the step below the newest is now final
        if is_final_step(self.steps[-1]):
            self._finish(Outcome.FINAL_ANSWER)
        elif len(self.steps) >= self.max_steps:
            self._finish(Outcome.MAX_STEPS)
        else:
            self.phase = Phase.PROPOSE

    def _rollback(self) -> None:
        if self.num_rollbacks >= self.max_rollbacks:
            self._finish(Outcome.ABANDONED)
            return
        self.num_rollbacks += 1
        # The newest step is dropped unless committed (or none: step 1); else the same step is proposed again.
        if len(self.steps) > self.committed:
            self.steps.pop()
            self.pairs.pop()
            self._decided_at.pop()
        self.phase = Phase.PROPOSE

    def _finish(self, outcome: Outcome) -> None:
        self.phase, self.outcome = Phase.DONE, outcome

    @property
    def done(self) -> bool:
        return self.phase is Phase.DONE

    @property
    def solution(self) -> str:
        return join_steps(self.steps)

    def answer_correct(self) -> bool | None:
        """Whether the final answer verifies against the reference; None without either."""
        if self.outcome is not Outcome.FINAL_ANSWER or self.problem.answer is None:
            return None
        if self._answer_correct is None:
            self._answer_correct = is_equivalent(extract_answer(self.solution), self.problem.answer)
        return self._answer_correct

    def take_commit(self) -> tuple[list[StepPair], Checkpoint] | None:
        """The pairs committed since the last call and the checkpoint after them; None when no step was
        committed since. Call after every round, before the problem is done (then `finished_pairs()`)."""
        if self.done or self.committed == self._released:
            return None
        pairs = [p for p in self.pairs[self._released : self.committed] if p is not None]
        self._released = self.committed
        return pairs, self.checkpoint()

    def checkpoint(self) -> Checkpoint:
        """The state when the newest committed step was decided (see `Checkpoint`)."""
        proposals, rollbacks = self._decided_at[self.committed - 1] if self.committed else (0, 0)
        return Checkpoint(tuple(self.steps[: self.committed]), proposals, rollbacks)

    def finished_pairs(self) -> list[StepPair]:
        """The pairs not released yet, once the problem is DONE (none when abandoned), with the problem's
        `answer_correct`."""
        assert self.done, self.phase
        rest, self._released = self.pairs[self._released :], len(self.pairs)
        if self.outcome is Outcome.ABANDONED:
            return []
        correct = self.answer_correct()
        return [dataclasses.replace(p, answer_correct=correct) for p in rest if p is not None]
