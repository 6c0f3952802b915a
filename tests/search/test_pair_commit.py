"""Pairs leave a search as soon as their step is committed (the next step decided), exactly once, and a search
resumed from a commit's checkpoint continues as the lost one would have. Real `ProblemSearch`, a deterministic
proposer keyed like the scheduler's seeds (step index, proposals accepted so far) and a judge fake."""

from __future__ import annotations

import pytest

from psr_ray.data.problems import Problem
from psr_ray.data.schema import Checkpoint, StepPair
from psr_ray.engines.api import Candidates, JudgeRequest, Judgment
from psr_ray.search.problem import Outcome, Phase, ProblemSearch

GOOD = ("1 a", "3 b", "2 c")
TIE = ("2 a", "2 b", "2 c")
FINAL = ("1 x", r"3 \boxed{4}", "2 y")


def judge(req: JudgeRequest) -> Judgment:
    """Prefers the larger leading digit; equal digits: unparseable (a tie when all are equal)."""
    a, b = int(req.step_a.split()[0]), int(req.step_b.split()[0])
    verdict = "A" if a > b else "B" if b > a else "unparseable"
    return Judgment(verdict, {"A": 1.0, "B": 0.0}.get(verdict, 0.5), "", 3, 0)


def make(max_rollbacks: int = 3, resume_from: Checkpoint | None = None) -> ProblemSearch:
    return ProblemSearch(Problem("p0", "What is 2+2?", "4"), iteration=1, max_steps=20,
                         max_rollbacks=max_rollbacks, resume_from=resume_from)  # fmt: skip


def step(search: ProblemSearch, candidates: tuple[str, ...]) -> tuple[list[StepPair], Checkpoint] | None:
    """One round: propose, judge, and take what it committed."""
    search.propose_request()
    search.on_candidates(Candidates(steps=candidates, num_tokens=10, policy_version=0))
    if search.phase is Phase.JUDGE:
        search.on_judgments([judge(r) for r in search.judge_requests()])
    return search.take_commit()


def ids(pairs: list[StepPair]) -> list[str]:
    return [p.pair_id for p in pairs]


def test_a_pair_is_released_when_the_next_step_is_decided_and_the_rest_at_the_end():
    search = make()
    assert step(search, GOOD) is None  # step 1 decided: a tie at step 2 could still drop it
    pairs, checkpoint = step(search, GOOD)
    assert ids(pairs) == ["1/p0/1"] and pairs[0].answer_correct is None  # not known yet
    assert checkpoint == Checkpoint(("3 b",), num_proposals=1, num_rollbacks=0)
    assert step(search, TIE) is None  # pops step 2, which was not committed
    assert search.steps == ["3 b"] and search.committed == 1
    assert step(search, GOOD) is None  # step 2 again: nothing new committed
    assert step(search, FINAL) is None and search.done  # a done search hands out the rest below
    rest = search.finished_pairs()
    assert ids(rest) == ["1/p0/2", "1/p0/3"] and [p.answer_correct for p in rest] == [True, True]
    assert search.finished_pairs() == []  # handed out once


def test_a_tie_above_committed_steps_proposes_the_step_again_instead_of_popping_them():
    search = make(max_rollbacks=3)
    step(search, GOOD)
    step(search, GOOD)  # commits step 1
    step(search, GOOD)  # commits step 2
    assert search.committed == 2
    step(search, TIE)  # pops step 3 (not committed)
    step(search, TIE)  # step 3 again: a tie, but step 2 is committed: step 3 once more
    assert search.steps == ["3 b", "3 b"] and search.num_rollbacks == 2
    assert search.propose_request().step_index == 3
    step(search, TIE)
    assert step(search, TIE) is None and search.outcome is Outcome.ABANDONED  # 3 rollbacks spent
    assert search.finished_pairs() == []  # the uncommitted pair is dropped; steps 1-2 left before


def test_take_commit_never_hands_out_a_pair_twice():
    search = make()
    seen: list[str] = []
    for candidates in (GOOD, GOOD, TIE, GOOD, GOOD, TIE, TIE, GOOD, FINAL):
        commit = step(search, candidates)
        if commit is not None:
            seen += ids(commit[0])
    seen += ids(search.finished_pairs())
    assert len(seen) == len(set(seen)) and seen == [f"1/p0/{k}" for k in range(1, len(seen) + 1)]


TIED = {(2, 1), (3, 3), (3, 4), (2, 5), (4, 7), (4, 8), (4, 9)}  # (step index, proposals before it)


def proposer(num_proposals: int, step_index: int) -> tuple[str, ...]:
    """Candidates from the scheduler's seed key: the same (step, attempt) always gives the same steps; the
    attempts in `TIED` tie (roll back), step 5 is final."""
    if step_index >= 5:
        return FINAL
    if (step_index, num_proposals) in TIED:
        return TIE
    return (f"1 s{step_index}a{num_proposals}", f"3 s{step_index}a{num_proposals}", f"2 s{step_index}a{num_proposals}")


def run_from(search: ProblemSearch) -> tuple[list[StepPair], list[Checkpoint]]:
    """Drives a search to its end; every pair it releases (commits, then the rest) and every checkpoint."""
    released: list[StepPair] = []
    checkpoints: list[Checkpoint] = []
    while not search.done:
        commit = step(search, proposer(search.num_proposals, search.step_index))
        if commit is not None:
            released += commit[0]
            checkpoints.append(commit[1])
    return released + search.finished_pairs(), checkpoints


@pytest.mark.parametrize("max_rollbacks", [1, 3, 6])
def test_a_search_resumed_from_any_checkpoint_releases_what_the_lost_one_would_have(max_rollbacks):
    whole, checkpoints = run_from(make(max_rollbacks))
    assert checkpoints, "the scenario commits steps"
    for checkpoint in checkpoints:
        # The lost run had released every pair up to the checkpoint's steps (the manifest's part).
        before = [p for p in whole if p.step_index <= len(checkpoint.steps)]
        after, _ = run_from(make(max_rollbacks, resume_from=checkpoint))
        assert [p.to_row() for p in before + after] == [p.to_row() for p in whole]
