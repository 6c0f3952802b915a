"""Issue 13b: a pair reaches DPO only when the judge really preferred its chosen step, by at least
`search.min_score_margin`; ties are decided over the candidates that could be rejected; identical candidates
advance without a pair; every pair stores its margin and the search summary reports their distribution."""

from __future__ import annotations

import pytest

from psr_ray import config as C
from psr_ray.config import JudgeMode
from psr_ray.data.problems import Problem
from psr_ray.engines.api import Candidates, JudgeRequest, Judgment
from psr_ray.pipeline import preflight
from psr_ray.search.problem import Outcome, Phase, ProblemSearch
from psr_ray.search.stats import margin_summary


def judgment(prob_a: float) -> Judgment:
    verdict = "A" if prob_a > 0.5 else "B" if prob_a < 0.5 else "unparseable"
    return Judgment(verdict=verdict, prob_a=prob_a, text="", num_tokens=1, policy_version=0)


def leading_digit_judge(req: JudgeRequest) -> Judgment:
    """The larger leading digit wins ('3 ...' beats '1 ...'); equal digits: no verdict."""
    a, b = int(req.step_a.split()[0]), int(req.step_b.split()[0])
    return judgment(1.0 if a > b else 0.0 if b > a else 0.5)


def run_search(rounds, judge=leading_digit_judge, **kwargs) -> ProblemSearch:
    """Drives a search whose proposals come from `rounds` (one tuple of candidates per propose call)."""
    search = ProblemSearch(Problem("p0", "What is 2+2?", "4"), iteration=1, max_steps=3, max_rollbacks=3, **kwargs)
    rounds = iter(rounds)
    while not search.done:
        search.propose_request()
        search.on_candidates(Candidates(steps=next(rounds), num_tokens=4, policy_version=1))
        if search.phase is Phase.JUDGE:
            search.on_judgments([judge(r) for r in search.judge_requests()])
    return search


def test_scores_tied_among_rejectable_candidates_roll_back():
    # Scores [4, 4, 4, 0]: the empty step loses every comparison but can never be rejected, so among the
    # steps that could be, the judge saw no difference: roll back, never a pair with equal scores.
    search = run_search([("2 a", "2 b", "2 c", ""), ("1 x", "3 y", "2 z"), ("1 x", r"3 \boxed{4}", "2 z")])
    assert search.num_rollbacks == 1 and search.outcome is Outcome.FINAL_ANSWER
    pairs = search.finished_pairs()
    assert [p.step_index for p in pairs] == [1, 2]
    assert all(p.chosen_score - p.rejected_score >= 1.0 for p in pairs)
    assert [p.margin for p in pairs] == [4.0, 4.0]


def test_soft_vote_margins_below_the_minimum_are_ties():
    # Direct mode: a position-biased judge (P(A) about 0.98) whose soft votes differ by noise only.
    noisy = {
        ("a", "b"): 0.985,
        ("b", "a"): 0.975,
        ("a", "c"): 0.98,
        ("c", "a"): 0.99,
        ("b", "c"): 0.97,
        ("c", "b"): 0.98,
    }

    def judge(req: JudgeRequest) -> Judgment:
        return judgment(noisy.get((req.step_a, req.step_b), 1.0 if req.step_a.startswith("3") else 0.0))

    search = run_search([("a", "b", "c"), ("1 x", r"3 \boxed{4}")], judge=judge, judge_mode=JudgeMode.DIRECT)
    assert search.num_rollbacks == 1  # margins of a few hundredths: not a preference
    (pair,) = search.finished_pairs()
    assert pair.chosen == r"3 \boxed{4}" and pair.margin == pytest.approx(2.0)
    # The same round under a smaller minimum margin is a pair, and its margin is stored as decided.
    search = run_search([("a", "b", "c")] * 2 + [(r"3 \boxed{4}", "1 x")], judge=judge,
                        judge_mode=JudgeMode.DIRECT, min_score_margin=0.02)  # fmt: skip
    first = search.finished_pairs()[0]
    assert search.num_rollbacks == 0
    assert first.margin == pytest.approx(first.chosen_score - first.rejected_score) and first.margin >= 0.02


def test_identical_candidates_advance_without_a_pair():
    # An easy step every sample writes the same way: nothing to prefer, but no reason to drop step 1.
    search = run_search([("1 x", "3 y", "2 z"), ("2 same", " 2 same", "2 same"), ("1 x", r"3 \boxed{4}")])
    assert search.num_rollbacks == 0 and search.outcome is Outcome.FINAL_ANSWER
    assert search.steps == ["3 y", "2 same", r"3 \boxed{4}"]
    assert [p.step_index for p in search.finished_pairs()] == [1, 3]
    assert search.num_steps_without_pair == 1


def test_all_empty_candidates_roll_back():
    search = run_search([("", " ", ""), ("1 x", r"3 \boxed{4}")])
    assert search.num_rollbacks == 1 and [p.step_index for p in search.finished_pairs()] == [1]


def test_margin_summary_quartiles():
    assert margin_summary([]) == {"margin_min": None, "margin_q1": None, "margin_median": None,
                                  "margin_q3": None, "margin_max": None}  # fmt: skip
    assert margin_summary([3.0, 1.0, 2.0, 5.0, 4.0]) == {
        "margin_min": 1.0, "margin_q1": 2.0, "margin_median": 3.0, "margin_q3": 4.0, "margin_max": 5.0,
    }  # fmt: skip
    assert margin_summary([1.0, 2.0])["margin_median"] == 1.5


def test_min_score_margin_is_configured_and_validated():
    assert C.PSRConfig().search.min_score_margin == 1.0
    with pytest.raises(ValueError, match=r"search\.min_score_margin"):
        preflight.validate(C.load([], ["search.min_score_margin=0"]), gpu_available=False, check_paths=False)
