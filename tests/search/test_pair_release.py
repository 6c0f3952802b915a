"""PairLedger: when a search's pairs are decided, pass out of roll-back reach, and are released or lost,
stamped on the real `ProblemSearch` state machine with a deterministic judge fake and a counted clock."""

from __future__ import annotations

from psr_ray.data.problems import Problem
from psr_ray.engines.api import Candidates, JudgeRequest, Judgment
from psr_ray.search.problem import Phase, ProblemSearch
from psr_ray.search.release import PairLedger, out_of_reach


def judge(req: JudgeRequest) -> Judgment:
    """Prefers the larger leading digit; equal digits: unparseable (a tie when all are equal)."""
    a, b = int(req.step_a.split()[0]), int(req.step_b.split()[0])
    verdict = "A" if a > b else "B" if b > a else "unparseable"
    return Judgment(verdict, {"A": 1.0, "B": 0.0}.get(verdict, 0.5), "", 3, 0)


def run(search: ProblemSearch, rounds: list[tuple[str, ...]], ledger: PairLedger) -> None:
    """Feeds one candidate set per round (time = the round's number) and finishes at the end."""
    for now, steps in enumerate(rounds, start=1):
        search.on_candidates(Candidates(steps=steps, num_tokens=10, policy_version=0))
        before = ledger.snapshot(search)
        if search.phase is Phase.JUDGE:
            search.on_judgments([judge(r) for r in search.judge_requests()])
        ledger.after(search, before, float(now))
    assert search.done
    ledger.finish(search, float(len(rounds) + 10))


def make(max_rollbacks: int) -> ProblemSearch:
    return ProblemSearch(Problem("p0", "What is 2+2?", None), iteration=1, max_steps=20, max_rollbacks=max_rollbacks)


GOOD = ("1 a", "3 b", "2 c")
TIE = ("2 a", "2 b", "2 c")
FINAL = ("1 x", r"3 \boxed{4}", "2 y")


def test_out_of_reach_needs_more_rollbacks_than_are_left():
    assert not out_of_reach(3, 2, 1)  # the newest step: one roll-back pops it
    assert out_of_reach(3, 2, 0)
    assert not out_of_reach(3, 1, 2) and out_of_reach(3, 0, 2)


def test_rollback_pops_a_pair_and_the_redecided_step_waits_from_its_new_decision():
    ledger = PairLedger()
    # t1 step 1; t2 step 2; t3 tie at step 3 pops step 2; t4 step 2 again; t5 final step 3; released at t15.
    run(make(max_rollbacks=1), [GOOD, GOOD, TIE, GOOD, FINAL], ledger)
    assert ledger.popped == 1 and ledger.dropped == 0
    assert ledger.waits == [15 - 1, 15 - 4, 15 - 5]
    assert ledger.released_at == [15.0] * 3
    # One roll-back left until t3, none after: step 1 is out of reach at t2 (2 pops needed, 1 left), the
    # redecided step 2 at t4 and step 3 at t5 (none left).
    assert ledger.early == [15 - 2, 15 - 4, 15 - 5]


def test_abandoned_problem_drops_its_pairs_even_out_of_reach():
    ledger = PairLedger()
    run(make(max_rollbacks=0), [GOOD, GOOD, TIE], ledger)
    assert ledger.dropped == 2 and ledger.popped == 0
    assert ledger.waits == [] and ledger.early == [] and ledger.released_at == []
    assert set(ledger.reach_left) == {"1/p0/1", "1/p0/2"}  # both were out of reach, and both were lost
