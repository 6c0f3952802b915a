"""PairLedger: when a search's pairs are decided and reach the stream, and which are lost, stamped on the real
`ProblemSearch` state machine with a deterministic judge fake and a counted clock (each round's commit flushed
at once, as `flush_pairs=1` does)."""

from __future__ import annotations

from psr_ray.data.problems import Problem
from psr_ray.engines.api import Candidates, JudgeRequest, Judgment
from psr_ray.search.problem import Phase, ProblemSearch
from psr_ray.search.release import PairLedger


def judge(req: JudgeRequest) -> Judgment:
    """Prefers the larger leading digit; equal digits: unparseable (a tie when all are equal)."""
    a, b = int(req.step_a.split()[0]), int(req.step_b.split()[0])
    verdict = "A" if a > b else "B" if b > a else "unparseable"
    return Judgment(verdict, {"A": 1.0, "B": 0.0}.get(verdict, 0.5), "", 3, 0)


def run(search: ProblemSearch, rounds: list[tuple[str, ...]], ledger: PairLedger) -> None:
    """Feeds one candidate set per round (time = the round's number), flushing what each round commits."""
    for now, steps in enumerate(rounds, start=1):
        search.on_candidates(Candidates(steps=steps, num_tokens=10, policy_version=0))
        ledger.after(search, now - 0.5)  # candidates in: nothing decided
        if search.phase is Phase.JUDGE:
            search.on_judgments([judge(r) for r in search.judge_requests()])
        ledger.after(search, float(now))
        commit = search.take_commit()
        if commit is not None:
            ledger.flushed([p.pair_id for p in commit[0]], float(now))
    assert search.done
    ledger.finish(search)
    ledger.flushed([p.pair_id for p in search.finished_pairs()], float(len(rounds)))


def make(max_rollbacks: int) -> ProblemSearch:
    return ProblemSearch(Problem("p0", "What is 2+2?", None), iteration=1, max_steps=20, max_rollbacks=max_rollbacks)


GOOD = ("1 a", "3 b", "2 c")
SAME = ("2 s", "2 s", "2 s")  # identical: the step advances without a pair, decided without a judge call
TIE = ("2 a", "2 b", "2 c")
FINAL = ("1 x", r"3 \boxed{4}", "2 y")


def test_a_pair_waits_one_step_and_a_redecided_step_waits_from_its_new_decision():
    ledger = PairLedger()
    # t1 step 1; t2 step 2 (commits step 1); t3 tie at step 3 pops step 2; t4 step 2 again; t5 final step 3.
    run(make(max_rollbacks=1), [GOOD, GOOD, TIE, GOOD, FINAL], ledger)
    assert ledger.popped == 1 and ledger.dropped == 0
    assert ledger.waits == [2 - 1, 5 - 4, 5 - 5]
    assert ledger.commit_waits == ledger.waits  # flushed as soon as committed
    assert ledger.flushed_at == [2.0, 5.0, 5.0]
    assert ledger.step_times == [1.0] * 4


def test_an_abandoned_problem_drops_only_its_uncommitted_pair():
    ledger = PairLedger()
    run(make(max_rollbacks=0), [GOOD, GOOD, TIE], ledger)
    assert ledger.dropped == 1 and ledger.popped == 0
    assert ledger.waits == [1.0] and ledger.flushed_at == [2.0]  # step 1's pair left before the tie


def test_a_step_decided_without_a_judge_call_commits_the_pair_below_it():
    ledger = PairLedger()
    run(make(max_rollbacks=0), [GOOD, SAME, FINAL], ledger)
    # Step 2 (identical candidates) is decided when its candidates land, at t1.5: step 1's pair commits then.
    assert ledger.commit_waits == [0.5, 0.0] and ledger.step_times == [0.5, 1.5]
    assert ledger.waits == [1.0, 0.0]  # flushed at t2 and t3
