"""The per-problem search state machine, with exact expected values from a deterministic judge fake."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from psr_ray.data.problems import Problem
from psr_ray.engines.api import Candidates, JudgeRequest, Judgment, ProposeRequest
from psr_ray.search.problem import Outcome, Phase, ProblemSearch
from psr_ray.search.scoring import Decision, decide_step, judge_plan, score_step


def J(verdict: str, prob_a: float | None = None) -> Judgment:
    if prob_a is None:
        prob_a = {"A": 1.0, "B": 0.0}.get(verdict, 0.5)
    return Judgment(verdict=verdict, prob_a=prob_a, text="", num_tokens=3, policy_version=0)


def quality_judge(req: JudgeRequest) -> Judgment:
    """Prefers the step with the larger leading digit ('3 ...' beats '1 ...'); equal digits: unparseable."""
    a, b = int(req.step_a.split()[0]), int(req.step_b.split()[0])
    return J("A" if a > b else "B" if b > a else "unparseable")


def drive(search: ProblemSearch, propose: Callable[[ProposeRequest], tuple[str, ...]], judge=quality_judge):
    """Runs a search to the end; returns the ProposeRequests it made."""
    asked = []
    while not search.done:
        request = search.propose_request()
        asked.append(request)
        search.on_candidates(Candidates(steps=propose(request), num_tokens=10, policy_version=7))
        if search.phase is Phase.JUDGE:
            search.on_judgments([judge(r) for r in search.judge_requests()])
        assert len(asked) < 100, "search does not terminate"
    return asked


def make(max_steps=20, max_rollbacks=5, both_orders=True, reference=None, problem_id="p0"):
    return ProblemSearch(
        Problem(problem_id, "What is 2+2?", reference),
        iteration=3,
        max_steps=max_steps,
        max_rollbacks=max_rollbacks,
        both_orders=both_orders,
    )


def test_judge_plan_both_orders_and_alternating_single_order():
    assert judge_plan(["x", "y", "z"], both_orders=True) == [(0, 1), (1, 0), (0, 2), (2, 0), (1, 2), (2, 1)]
    # One order: the first-shown side alternates over the pairs.
    assert judge_plan(["w", "x", "y", "z"], both_orders=False) == [(0, 1), (2, 0), (0, 3), (2, 1), (1, 3), (3, 2)]
    # Identical (after strip) and empty candidates never reach the judge.
    assert judge_plan(["a", " a ", "", "b"], both_orders=True) == [(0, 3), (3, 0), (1, 3), (3, 1)]


def test_scores_follow_the_vote_matrix_and_unparseable_is_no_vote():
    cands = ["1 x", "3 y", "2 z"]
    plan = judge_plan(cands, both_orders=True)
    judgments = [quality_judge(JudgeRequest("q", "", cands[a], cands[b])) for a, b in plan]
    judgments[0] = J("unparseable")  # (0, 1): no vote
    result = score_step(cands, plan, judgments, both_orders=True)
    assert result.votes == [[0, 0, 0], [1, 0, 2], [2, 0, 0]]
    assert result.scores == [0, 3, 2]
    assert result.scores == [sum(row) for row in result.votes]
    assert (result.num_judgments, result.num_unparseable) == (6, 1)
    assert result.soft == [0.5, 3.5, 2.0]
    assert decide_step(cands, result, min_score_margin=1.0) == (Decision.PAIR, 1, 0, 3.0)


def test_identical_draw_and_empty_loses_without_judge():
    cands = ["2 a", "2 a ", "", "1 b"]
    plan = judge_plan(cands, both_orders=True)
    result = score_step(
        cands, plan, [quality_judge(JudgeRequest("q", "", cands[a], cands[b])) for a, b in plan], both_orders=True
    )
    # 0 and 1 draw (1 each over two orders), both beat 3 twice, the empty one loses to all non-empty.
    assert result.votes == [[0, 1, 2, 2], [1, 0, 2, 2], [0, 0, 0, 0], [0, 0, 2, 0]]
    assert result.scores == [5, 5, 0, 2]
    # Best: tie 0/1 on score and soft votes -> lowest index. Worst: the empty one is never rejected.
    assert decide_step(cands, result, min_score_margin=1.0) == (Decision.PAIR, 0, 3, 3.0)


def test_best_tie_broken_by_soft_votes_then_index():
    cands = ["a", "b", "c"]
    plan = [(0, 1), (2, 0), (1, 2)]  # one order each
    judgments = [J("A", 0.6), J("B", 0.2), J("A", 0.9)]  # 0 beats 1, 0 beats 2, 1 beats 2
    result = score_step(cands, plan, judgments, both_orders=False)
    assert result.scores == [2, 1, 0]
    judgments = [J("A", 0.6), J("A", 0.55), J("A", 0.9)]  # 0>1, 2>0, 1>2: a cycle, all scores 1
    result = score_step(cands, plan, judgments, both_orders=False)
    assert result.scores == [1, 1, 1]
    cands4 = ["a", "b", "c", "d"]
    plan4 = judge_plan(cands4, both_orders=False)  # [(0,1),(2,0),(0,3),(2,1),(1,3),(3,2)]
    # 0 and 2 both win twice; 2's wins are more confident, so 2 is best. 1 and 3 tie for worst on score;
    # 3 has fewer soft votes.
    judgments4 = [J("A", 0.6), J("A", 0.99), J("A", 0.6), J("B", 0.4), J("B", 0.45), J("B", 0.01)]
    result = score_step(cands4, plan4, judgments4, both_orders=False)
    assert result.scores == [2, 1, 2, 1]
    assert result.soft == pytest.approx([1.21, 1.45, 2.38, 0.96])
    assert decide_step(cands4, result, min_score_margin=1.0) == (Decision.PAIR, 2, 3, 1.0)
    assert decide_step(cands4, result, min_score_margin=1.5).decision is Decision.TIE


def test_search_reaches_final_answer_and_emits_one_pair_per_step():
    def propose(req: ProposeRequest) -> tuple[str, ...]:
        k = req.step_index
        best = f"3 step{k}" + (r" so \boxed{4}" if k == 2 else "")
        return (f"1 bad{k}", best, f"2 ok{k}")

    search = make(reference=None)
    asked = drive(search, propose)
    assert [r.step_index for r in asked] == [1, 2]
    assert search.outcome is Outcome.FINAL_ANSWER
    pairs = search.finished_pairs()
    assert [p.pair_id for p in pairs] == ["3/p0/1", "3/p0/2"]
    assert [(p.chosen, p.rejected) for p in pairs] == [("3 step1", "1 bad1"), (r"3 step2 so \boxed{4}", "1 bad2")]
    assert pairs[1].prefix == "Step 1: 3 step1\n"
    assert asked[1].prefix == "Step 1: 3 step1\n"
    p = pairs[0]
    assert (p.chosen_score, p.rejected_score, p.margin, p.candidate_scores) == (4, 0, 4, [0, 4, 2])
    assert p.vote_matrix == [[0, 0, 0], [2, 0, 2], [2, 0, 0]]
    assert (p.num_judgments, p.num_unparseable, p.num_candidates, p.policy_version) == (6, 0, 3, 7)
    assert (p.judge_mode, p.num_rollbacks, p.answer_correct, p.iteration) == ("explain", 0, None, 3)
    assert all(p.chosen != p.rejected for p in pairs)


def test_answer_correct_uses_verify_when_a_reference_is_known():
    pytest.importorskip("psr_ray.core.verify")

    def propose(req):
        return ("1 x", r"3 so \boxed{4}", "2 y")

    right, wrong = make(reference="4"), make(reference="5")
    drive(right, propose)
    drive(wrong, propose)
    assert [p.answer_correct for p in right.finished_pairs()] == [True]
    assert [p.answer_correct for p in wrong.finished_pairs()] == [False]


def test_rollback_drops_previous_step_and_its_pair_then_retries_it():
    attempts = {1: 0, 2: 0}

    def propose(req: ProposeRequest) -> tuple[str, ...]:
        k = req.step_index
        attempts[k] = attempts.get(k, 0) + 1
        if k == 2 and attempts[2] == 1:
            return ("2 same", "2 tie", "2 all")  # all unparseable -> all scores 0 -> rollback
        if k == 3:
            return ("1 x", r"3 \boxed{1}", "2 y")
        return (f"1 a{attempts[k]}", f"3 b{attempts[k]}", f"2 c{attempts[k]}")

    search = make()
    asked = drive(search, propose)
    # Step 1, step 2 (tie -> drop step 1), step 1 again, step 2, step 3 (final).
    assert [r.step_index for r in asked] == [1, 2, 1, 2, 3]
    assert asked[2].prefix == "" and asked[2] == asked[0]
    assert search.num_rollbacks == 1 and search.outcome is Outcome.FINAL_ANSWER
    pairs = search.finished_pairs()
    assert [p.pair_id for p in pairs] == ["3/p0/1", "3/p0/2", "3/p0/3"]
    # The dropped first step-1 pair ("3 b1") is gone; the retried one carries the rollback count.
    assert [p.chosen for p in pairs] == ["3 b2", "3 b2", r"3 \boxed{1}"]
    assert [p.num_rollbacks for p in pairs] == [1, 1, 1]
    assert search.num_judgments == 5 * 6 and search.num_unparseable == 6
    assert search.num_candidates_seen == 15 and search.num_generated_tokens == 50


def test_all_identical_candidates_advance_without_a_pair():
    calls = []

    def propose(req):
        calls.append(req.step_index)
        return ("1 same", " 1 same", "1 same") if len(calls) == 1 else ("1 x", r"2 \boxed{2}", "1 y")

    search = make()
    drive(search, propose)
    assert calls == [1, 2] and search.num_rollbacks == 0
    assert search.num_judgments == 6  # the identical round never reached the judge
    assert search.steps == ["1 same", r"2 \boxed{2}"]
    assert [p.step_index for p in search.finished_pairs()] == [2]


def test_max_rollbacks_abandons_and_releases_no_pairs():
    def propose(req):
        return ("2 a", "2 b", "2 c") if req.step_index == 2 else ("1 a", "3 b", "2 c")

    search = make(max_rollbacks=2)
    asked = drive(search, propose)
    assert [r.step_index for r in asked] == [1, 2, 1, 2, 1, 2]
    assert search.outcome is Outcome.ABANDONED and search.num_rollbacks == 2
    assert search.finished_pairs() == []


def test_step_cap_stops_without_final_answer():
    search = make(max_steps=3, both_orders=False)
    drive(search, lambda req: (f"1 a{req.step_index}", f"3 b{req.step_index}", f"2 c{req.step_index}"))
    assert search.outcome is Outcome.MAX_STEPS
    pairs = search.finished_pairs()
    assert [p.step_index for p in pairs] == [1, 2, 3]
    assert all(p.num_judgments == 3 and p.answer_correct is None for p in pairs)
    assert pairs[0].candidate_scores == [0, 2, 1]


def test_direct_mode_soft_votes_cancel_a_constant_position_bias():
    cands = ["x", "y", "z"]
    plan = judge_plan(cands, both_orders=True)  # [(0,1),(1,0),(0,2),(2,0),(1,2),(2,1)]
    # The judge says A almost always; how sure it is still carries the preference z > y > x.
    p_first = {(0, 1): 0.90, (1, 0): 0.96, (0, 2): 0.90, (2, 0): 0.98, (1, 2): 0.94, (2, 1): 0.97}
    judgments = [J("A", p_first[a, b]) for a, b in plan]
    hard = score_step(cands, plan, judgments, both_orders=True)
    assert hard.scores == [2, 2, 2]  # every candidate wins once per pair: a tie, the step would roll back
    soft = score_step(cands, plan, judgments, both_orders=True, soft_votes=True)
    assert soft.votes[0][1] == pytest.approx(0.90 + (1 - 0.96))
    assert soft.votes[1][0] == pytest.approx((1 - 0.90) + 0.96)
    assert soft.scores == pytest.approx([1.86, 2.03, 2.11])
    assert soft.scores == pytest.approx([sum(row) for row in soft.votes])
    # Best z, worst x, but by a quarter of a comparison: under the default minimum margin, a tie.
    assert decide_step(cands, soft, min_score_margin=0.2) == (Decision.PAIR, 2, 0, pytest.approx(0.25))
    assert decide_step(cands, soft, min_score_margin=1.0).decision is Decision.TIE
    # Unparseable stays no vote in either mode.
    judgments[0] = J("unparseable")
    assert score_step(cands, plan, judgments, both_orders=True, soft_votes=True).num_unparseable == 1
