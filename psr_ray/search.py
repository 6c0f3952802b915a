"""The step-wise self-judged search of PSR (arXiv 2503.03746, section 3.3) for one problem. Pure: no Ray.

At step k the policy proposes `num_candidates` next steps; the judge compares every unordered pair of
distinct candidates (in both orders by default) and candidate i scores the number of comparisons it wins:
``Score_i = sum_{j != i} votes[i][j]``. The best candidate continues the solution and (best, worst) becomes
a `StepPair`. When all scores are equal the judge saw no difference, which the paper reads as a sign that
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
  for worst by the lowest soft votes, then by the highest index. The rejected step must differ from the
  chosen one; if no such non-empty candidate exists the step advances without a pair.
- Pairs are held until the problem finishes (exactly once: a rollback can still drop them until then). A
  problem abandoned after `max_rollbacks` rollbacks releases no pairs: its path is not trusted.
- With one order per pair, which candidate is shown first alternates from pair to pair to spread position
  bias over the candidates.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any

from psr_ray.data.schema import StepPair
from psr_ray.engine_api import Candidates, JudgeRequest, Judgment, ProposeRequest
from psr_ray.prompts import Verdict, render_prefix
from psr_ray.steps import is_final_step


@dataclass(frozen=True)
class Problem:
    problem_id: str
    question: str
    reference_answer: str | None = None

    @staticmethod
    def coerce(item: Any) -> Problem:
        """A `Problem`, a `psr_ray.data.problems.Problem` (its `answer`), or a mapping with `problem_id`,
        `question` and optionally `reference_answer` / `answer`."""
        if isinstance(item, Problem):
            return item
        get = item.get if isinstance(item, dict) else lambda k, d=None: getattr(item, k, d)
        missing = [k for k in ("problem_id", "question") if get(k) is None]
        if missing:
            raise ValueError(f"a problem needs a problem_id and a question; {item!r} lacks {missing}")
        ref = get("reference_answer", get("answer"))
        return Problem(str(get("problem_id")), str(get("question")), None if ref is None else str(ref))


class Phase(enum.Enum):
    PROPOSE = "propose"
    JUDGE = "judge"
    DONE = "done"


class Outcome(enum.Enum):
    FINAL_ANSWER = "final_answer"
    MAX_STEPS = "max_steps"
    ABANDONED = "abandoned"


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
        verdict = Verdict(judgment.verdict)
        if verdict is Verdict.UNPARSEABLE:
            num_unparseable += 1
        elif soft_votes:
            votes[a][b] += judgment.prob_a
            votes[b][a] += 1.0 - judgment.prob_a
        elif verdict is Verdict.A:
            votes[a][b] += 1.0
        else:
            votes[b][a] += 1.0
        soft[a] += judgment.prob_a
        soft[b] += 1.0 - judgment.prob_a
    return StepScores(votes, soft, len(plan), num_unparseable)


def pick_best_worst(candidates: tuple[str, ...] | list[str], result: StepScores) -> tuple[int, int | None]:
    """(best, worst) indices; worst is None when no non-empty candidate differs from the best."""
    scores = result.scores
    n = len(candidates)
    best = max(range(n), key=lambda i: (scores[i], result.soft[i], -i))
    chosen = candidates[best].strip()
    rejectable = [i for i in range(n) if candidates[i].strip() and candidates[i].strip() != chosen]
    if not rejectable:
        return best, None
    worst = min(rejectable, key=lambda i: (scores[i], result.soft[i], -i))
    return best, worst


class ProblemSearch:
    """The search of one problem as a state machine driven by a scheduler:
    PROPOSE: `propose_request()` -> engine -> `on_candidates()`;
    JUDGE: `judge_requests()` -> judges -> `on_judgments()`; until DONE, then `finished_pairs()`.
    """

    def __init__(
        self,
        problem: Problem,
        *,
        iteration: int,
        num_candidates: int,
        max_steps: int,
        max_rollbacks: int,
        both_orders: bool = True,
        judge_mode: str = "explain",
    ) -> None:
        self.problem = problem
        self.iteration = iteration
        self.num_candidates = num_candidates
        self.max_steps = max_steps
        self.max_rollbacks = max_rollbacks
        self.both_orders = both_orders
        self.judge_mode = judge_mode
        self.steps: list[str] = []
        self.pairs: list[StepPair | None] = []  # pairs[k] belongs to steps[k]
        self.phase = Phase.PROPOSE
        self.outcome: Outcome | None = None
        self.num_rollbacks = 0
        # Totals over every round, dropped ones included (for counters).
        self.num_candidates_seen = 0
        self.num_generated_tokens = 0
        self.num_judgments = 0
        self.num_unparseable = 0
        self._candidates: Candidates | None = None
        self._plan: list[tuple[int, int]] = []
        self._answer_correct: bool | None = None

    @property
    def step_index(self) -> int:
        """1-based index of the step being searched."""
        return len(self.steps) + 1

    @property
    def prefix(self) -> str:
        return render_prefix(self.steps)

    def propose_request(self) -> ProposeRequest:
        assert self.phase is Phase.PROPOSE, self.phase
        return ProposeRequest(self.problem.question, self.prefix, self.step_index)

    def on_candidates(self, candidates: Candidates) -> None:
        assert self.phase is Phase.PROPOSE, self.phase
        self._candidates = candidates
        self.num_candidates_seen += len(candidates.steps)
        self.num_generated_tokens += candidates.num_tokens
        self._plan = judge_plan(candidates.steps, both_orders=self.both_orders)
        self.phase = Phase.JUDGE
        if not self._plan:  # every pair auto-decided: nothing to ask the judge
            self.on_judgments([])

    def judge_requests(self) -> list[JudgeRequest]:
        assert self.phase is Phase.JUDGE and self._candidates is not None, self.phase
        steps, prefix = self._candidates.steps, self.prefix
        return [JudgeRequest(self.problem.question, prefix, steps[a], steps[b]) for a, b in self._plan]

    def on_judgments(self, judgments: list[Judgment]) -> None:
        assert self.phase is Phase.JUDGE and self._candidates is not None, self.phase
        cands = self._candidates
        result = score_step(
            cands.steps, self._plan, judgments, both_orders=self.both_orders, soft_votes=self.judge_mode == "direct"
        )
        self.num_judgments += result.num_judgments
        self.num_unparseable += result.num_unparseable
        self._candidates, self._plan = None, []
        scores = result.scores
        if len(cands.steps) < 2 or all(s == scores[0] for s in scores):
            self._rollback()
            return
        best, worst = pick_best_worst(cands.steps, result)
        pair = None
        if worst is not None:
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
                num_candidates=len(cands.steps),
                candidates=list(cands.steps),
                candidate_scores=scores,
                vote_matrix=result.votes,
                num_judgments=result.num_judgments,
                num_unparseable=result.num_unparseable,
                judge_mode=self.judge_mode,
                policy_version=cands.policy_version,
                num_rollbacks=self.num_rollbacks,
                reference_answer=self.problem.reference_answer,
            )
        self.steps.append(cands.steps[best].strip())
        self.pairs.append(pair)
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
        if self.steps:  # at step 1 there is nothing to drop: step 1 is simply proposed again
            self.steps.pop()
            self.pairs.pop()
        self.phase = Phase.PROPOSE

    def _finish(self, outcome: Outcome) -> None:
        self.phase, self.outcome = Phase.DONE, outcome

    @property
    def done(self) -> bool:
        return self.phase is Phase.DONE

    @property
    def solution(self) -> str:
        return render_prefix(self.steps)

    def answer_correct(self) -> bool | None:
        """Whether the final answer verifies against the reference; None without either (or without
        psr_ray.verify)."""
        if self.outcome is not Outcome.FINAL_ANSWER or self.problem.reference_answer is None:
            return None
        if self._answer_correct is None:
            try:
                from psr_ray.verify import extract_answer, is_equivalent
            except ImportError:
                return None
            predicted = extract_answer(self.solution)
            self._answer_correct = predicted is not None and bool(
                is_equivalent(predicted, self.problem.reference_answer)
            )
        return self._answer_correct

    def finished_pairs(self) -> list[StepPair]:
        """The problem's pairs, released once it is DONE (none when abandoned)."""
        assert self.done, self.phase
        if self.outcome is Outcome.ABANDONED:
            return []
        correct = self.answer_correct()
        return [dataclasses.replace(p, answer_correct=correct) for p in self.pairs if p is not None]
