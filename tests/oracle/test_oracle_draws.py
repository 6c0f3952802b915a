"""The oracle judge's draws (two right or two wrong steps) count half a win each, as identical candidates do:
counted as no vote, two copies of one wrong step outscored the other wrong steps and a wrong-vs-wrong pair
reached DPO (32 of the 79 pairs of an oracle-judged embedded iteration). Pure: the real exact check on a
real problem of the built-in task, the real search and judge plans, no Ray."""

from __future__ import annotations

import pytest

from psr_ray.config import JudgeMode, JudgePlan
from psr_ray.data.problems import load_problems
from psr_ray.engines.api import Candidates
from psr_ray.oracle.judge import label_steps, oracle_round
from psr_ray.search.problem import Phase, ProblemSearch
from psr_ray.testing.arith_engine import off_by


def first_problem():
    problem = load_problems("embedded:arith", split="train", seed=None).problems[0]
    right = problem.steps[0]
    wrong = [off_by(right, d) for d in (1, 2, 3)]
    assert label_steps(problem, "", [right, *wrong]) == [True, False, False, False]
    return problem, right, wrong


def judge_one_step(problem, candidates, plan: JudgePlan) -> ProblemSearch:
    search = ProblemSearch(problem, iteration=1, max_steps=6, max_rollbacks=2, judge_mode=JudgeMode.ORACLE,
                           min_score_margin=0.01, judge_plan=plan)  # fmt: skip
    search.propose_request()
    search.on_candidates(Candidates(steps=tuple(candidates), num_tokens=4, policy_version=1))
    while search.phase is Phase.JUDGE:
        judgments, all_right = oracle_round(problem, search.judge_requests(), policy_version=1)
        search.on_judgments(judgments, all_right=all_right)
    return search


@pytest.mark.parametrize("plan", list(JudgePlan))
def test_wrong_steps_only_tie_even_with_a_duplicate(plan):
    problem, _, wrong = first_problem()
    search = judge_one_step(problem, [wrong[0], wrong[1], wrong[0], wrong[2]], plan)
    assert search.num_rollbacks == 1 and search.steps == [] and search.num_unparseable == 0


@pytest.mark.parametrize("plan", list(JudgePlan))
def test_a_pair_always_prefers_the_right_step(plan):
    problem, right, wrong = first_problem()
    search = judge_one_step(problem, [wrong[0], wrong[0], right, wrong[1]], plan)
    (pair,) = [p for p in search.pairs if p is not None]
    assert label_steps(problem, "", [pair.chosen, pair.rejected]) == [True, False]
    assert pair.margin > 0.01
