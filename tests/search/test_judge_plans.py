"""Judge plans (`judge.plan`): exact call counts and picks on known verdict matrices, the multi-round state
machine, and each plan end to end on a real local Ray with the tiny vLLM engines."""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from psr_ray.config import JudgeConfig, JudgeMode, JudgePlan, PSRConfig, RolloutConfig, SearchConfig
from psr_ray.data.problems import Problem
from psr_ray.engines.api import Candidates, Judgment
from psr_ray.search.plans import KnockoutRun, first_round_calls, max_calls, num_rounds, start_plan
from psr_ray.search.problem import Phase, ProblemSearch
from psr_ray.search.scoring import Decision


def J(prob_a: float, verdict: str | None = None) -> Judgment:
    verdict = verdict or ("A" if prob_a > 0.5 else "B" if prob_a < 0.5 else "unparseable")
    return Judgment(verdict=verdict, prob_a=prob_a, text="", num_tokens=1, policy_version=0)


def run_plan(run, judge) -> int:
    """Feeds every round of `run` from `judge(a, b) -> Judgment`; returns the number of rounds."""
    rounds = 0
    while not run.done:
        run.feed([judge(a, b) for a, b in run.requests])
        rounds += 1
    return rounds


def test_call_counts_stay_within_two_n_minus_one():
    assert max_calls(JudgePlan.ROUND_ROBIN, 6, both_orders=True) == 30
    assert max_calls(JudgePlan.KNOCKOUT, 6, both_orders=True) == 10
    assert max_calls(JudgePlan.KNOCKOUT, 6, both_orders=False) == 7
    assert first_round_calls(JudgePlan.KNOCKOUT, 6, both_orders=True) == 6
    for n in range(2, 10):
        assert max_calls(JudgePlan.KNOCKOUT, n, both_orders=True) == 2 * (n - 1)
        strength = list(range(n))
        run = start_plan(JudgePlan.KNOCKOUT, [f"s{i}" for i in range(n)], both_orders=True, soft_votes=False)
        rounds = run_plan(run, lambda a, b, s=strength: J(1.0 if s[a] > s[b] else 0.0))
        assert run.num_judgments == 2 * (n - 1) and rounds == num_rounds(n)
    assert num_rounds(6) == 3


@pytest.mark.parametrize("both_orders", [True, False])
def test_knockout_finds_best_and_worst_of_every_consistent_order(both_orders):
    """A judge that always prefers the stronger step (hard votes): every one of the 720 orders of 6."""
    cands = [f"step {i}" for i in range(6)]
    for strength in itertools.permutations(range(6)):
        run = start_plan(JudgePlan.KNOCKOUT, cands, both_orders=both_orders, soft_votes=False)
        run_plan(run, lambda a, b, s=strength: J(1.0 if s[a] > s[b] else 0.0))
        result = run.decide(min_score_margin=1.0)
        assert result.decision.best == strength.index(5) and result.decision.worst == strength.index(0)
        assert result.decision.decision is Decision.PAIR
        assert result.votes.num_judgments == (10 if both_orders else 7)
        # Best won every call it took, worst lost every one: the round robin margin, 5 opponents x orders.
        assert result.decision.margin == (10.0 if both_orders else 5.0)


def test_knockout_matches_round_robin_on_a_known_soft_matrix_with_position_bias():
    """Direct-mode soft votes: P(A) = 0.9 + 0.02 x (quality difference), a judge that says A 90% of the time.
    Uncorrected, the first-shown step of a one-order match wins; with the bias measured on round 1 the later
    rounds follow quality, and both plans pick the same (best, worst)."""
    quality = [2, 5, 0, 3, 1, 4]
    cands = [f"c{i}" for i in range(6)]

    def judge(a, b):
        return J(min(1.0, 0.9 + 0.02 * (quality[a] - quality[b])))

    picks = {}
    for plan in JudgePlan:
        run = start_plan(plan, cands, both_orders=True, soft_votes=True)
        run_plan(run, judge)
        result = run.decide(min_score_margin=0.1)
        picks[plan] = (result.decision.best, result.decision.worst, result.decision.decision)
    assert picks[JudgePlan.KNOCKOUT] == picks[JudgePlan.ROUND_ROBIN] == (1, 2, Decision.PAIR)
    knockout = start_plan(JudgePlan.KNOCKOUT, cands, both_orders=True, soft_votes=True)
    run_plan(knockout, judge)
    assert knockout.position_bias == pytest.approx(0.4)


def test_indifferent_judge_ties_and_identical_or_empty_candidates_skip_the_judge():
    run = start_plan(JudgePlan.KNOCKOUT, ["a", "b", "c", "d"], both_orders=True, soft_votes=True)
    run_plan(run, lambda a, b: J(0.5, "A"))
    result = run.decide(min_score_margin=1.0)
    assert result.decision.decision is Decision.TIE and result.decision.margin == 0.0

    run = start_plan(JudgePlan.KNOCKOUT, ["x", " x ", "", "y"], both_orders=True, soft_votes=False)
    assert run.requests == [(0, 3), (3, 0)]  # the duplicate and the empty step are not judged
    run_plan(run, lambda a, b: J(1.0 if a == 3 else 0.0))
    result = run.decide(min_score_margin=1.0)
    assert (result.decision.best, result.decision.worst) == (3, 0)
    assert result.scores == [0.0, 0.0, 0.0, 2.0]  # the duplicate shares its text's score, the empty one 0

    same = start_plan(JudgePlan.KNOCKOUT, ["x", "x ", ""], both_orders=True, soft_votes=False)
    assert same.requests == []
    same.feed([])
    assert same.decide(min_score_margin=1.0).decision[:3] == (Decision.NO_PAIR, 0, None)
    empty = start_plan(JudgePlan.KNOCKOUT, ["", " "], both_orders=True, soft_votes=False)
    empty.feed([])
    assert empty.decide(min_score_margin=1.0).decision.decision is Decision.TIE


def test_a_bye_that_wins_both_knockouts_is_best_and_the_other_finalist_worst():
    """5 distinct steps: 4 is the bye. The judge says 4 beats 0 and 2 (the round-1 winners) but loses to 1
    and 3 (the losers): inconsistent, yet the plan still names a worst other than the best."""

    def judge(a, b):
        if 4 in (a, b):
            other = b if a == 4 else a
            win4 = other in (0, 2)
            return J(1.0 if (a == 4) == win4 else 0.0)
        return J(1.0 if a < b else 0.0)  # lower index is better

    run = start_plan(JudgePlan.KNOCKOUT, [f"s{i}" for i in range(5)], both_orders=True, soft_votes=False)
    run_plan(run, judge)
    assert run.num_judgments == 8
    result = run.decide(min_score_margin=0.5)
    assert result.decision.best == 4 and result.decision.worst == 3


def test_problem_search_asks_each_knockout_round_in_turn():
    search = ProblemSearch(
        Problem("p0", "What is 2+2?", None), iteration=1, max_steps=1, max_rollbacks=0,
        judge_mode=JudgeMode.DIRECT, judge_plan=JudgePlan.KNOCKOUT,
    )  # fmt: skip
    quality = [0, 3, 1, 5, 2, 4]
    search.on_candidates(Candidates(tuple(f"step {q}" for q in quality), num_tokens=6, policy_version=0))
    sizes = []
    while search.phase is Phase.JUDGE:
        requests = search.judge_requests()
        sizes.append(len(requests))
        qa = [int(r.step_a.split()[1]) for r in requests]
        qb = [int(r.step_b.split()[1]) for r in requests]
        search.on_judgments([J(0.8 + 0.03 * (a - b)) for a, b in zip(qa, qb, strict=True)])
    assert sizes == [6, 2, 2] and search.num_judgments == 10
    (pair,) = search.finished_pairs()
    assert (pair.chosen, pair.rejected) == ("step 5", "step 0")
    assert pair.margin == pytest.approx(pair.chosen_score - pair.rejected_score)


def test_judge_plan_is_configured_and_validated():
    from psr_ray.config import from_dict

    assert PSRConfig().judge.plan is JudgePlan.ROUND_ROBIN
    assert from_dict({"judge": {"plan": "knockout"}}).judge.plan is JudgePlan.KNOCKOUT
    with pytest.raises(ValueError, match=r"^judge.plan must be one of round_robin, knockout, got 'swiss'$"):
        from_dict({"judge": {"plan": "swiss"}})


def test_knockout_rejects_a_wrong_number_of_judgments():
    run = KnockoutRun(["a", "b"], both_orders=True, soft_votes=False)
    with pytest.raises(ValueError, match="got 1 judgments for 2 comparisons"):
        run.feed([J(1.0)])


@pytest.mark.ray
def test_each_plan_runs_end_to_end_with_real_tiny_engines(ray_cluster, tiny_model_dir, tmp_path):
    """Both plans through the scheduler on the real vLLM engines (tiny random model, direct mode): the tiny
    judge prefers one position, so one order per match gives pairs; with both orders knockout's bias
    correction is exercised. Judge calls per proposed step stay within each plan's bound."""
    from concurrent.futures import ThreadPoolExecutor

    from psr_ray.config import ModelConfig
    from psr_ray.data.pairs_io import read_pairs
    from psr_ray.engines.pool import start_engine_pool
    from psr_ray.pipeline.search_stage import generate_pairs

    n = 4
    base = dataclasses.replace(
        PSRConfig(),
        model=ModelConfig(max_model_len=512),
        rollout=RolloutConfig(num_candidates=n, max_step_tokens=12),
        judge=JudgeConfig(mode="direct", both_orders=False),
        search=SearchConfig(max_steps=2, max_rollbacks=2, max_problems_in_flight=4, min_score_margin=0.01),
    )
    with ThreadPoolExecutor(2) as pool:
        rollout_future = pool.submit(start_engine_pool, base, "rollout", tiny_model_dir)
        judge = start_engine_pool(base, "judge", tiny_model_dir)
        rollout = rollout_future.result()
    questions = ["Tom has 3 apples and buys 4 more. How many?", "What is 6 times 7?", "Half of 18 is?"]
    todo = [Problem(f"g{i}", q, None) for i, q in enumerate(questions)]
    runs = [(JudgePlan.ROUND_ROBIN, False), (JudgePlan.KNOCKOUT, False), (JudgePlan.KNOCKOUT, True)]
    try:
        for k, (plan, both_orders) in enumerate(runs):
            cfg = dataclasses.replace(base, judge=dataclasses.replace(base.judge, plan=plan, both_orders=both_orders))
            out = tmp_path / f"run{k}"
            summary = generate_pairs(cfg, todo, iteration=1, policy_version=0, rollout=rollout, judge=judge,
                                     output_dir=str(out))  # fmt: skip
            steps = summary.candidates // n
            assert summary.problems_done + summary.problems_abandoned == len(todo) and steps >= len(todo)
            assert 0 < summary.judge_calls <= steps * max_calls(plan, n, both_orders=both_orders)
            rows = read_pairs(str(out), 1).to_pylist()
            assert len(rows) == summary.pairs
            assert all(r["chosen"] != r["rejected"] and r["margin"] >= 0.01 for r in rows)
            if not both_orders:  # the first-shown step wins every match: pairs are certain
                assert summary.pairs > 0
    finally:
        for actor in rollout.actors + judge.actors:
            ray_cluster.kill(actor)
