"""`judge.mode: likelihood` (the ablation): a step's candidates ranked by the policy's own log-probability of
each. The round's rules with exact values, the search driven by the fake arith engine's `score_steps`, and the
real scheduler sending rounds to the engines' `score_steps` on a real local Ray."""

from __future__ import annotations

import dataclasses
import math
import sys

import pytest

from psr_ray.config import JudgeConfig, JudgeMode, PSRConfig, RolloutConfig, SearchConfig
from psr_ray.data.problems import Problem, load_problems
from psr_ray.engines.api import ScoreRequest, StepLikelihood
from psr_ray.oracle.judge import label_steps
from psr_ray.search.likelihood import LikelihoodRun
from psr_ray.search.problem import Outcome, Phase, ProblemSearch
from psr_ray.search.scoring import Decision
from psr_ray.testing.arith_engine import ArithEngine, off_by, off_by_one


def L(logprob: float, num_tokens: int) -> StepLikelihood:
    return StepLikelihood(logprob, num_tokens, policy_version=0)


def test_the_best_is_the_highest_mean_log_prob_per_token_and_the_worst_the_lowest():
    run = LikelihoodRun(["a b", "c", "d e f", "c "])
    assert run.requests == [0, 1, 2]  # "c " is "c": scored once
    # Sums -2, -1.5, -6 over 2, 1, 3 tokens: means -1, -1.5, -2. A sum would rank "c" first.
    run.feed([L(-2.0, 2), L(-1.5, 1), L(-6.0, 3)])
    votes, scores, decided = run.decide()
    assert scores == [-1.0, -1.5, -2.0, -1.5]
    assert decided == (Decision.PAIR, 0, 2, 1.0)
    assert votes.votes == [[0.0, 1.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.5], [0.0, 0.0, 0.0, 0.0], [0.0, 0.5, 1.0, 0.0]]
    assert (votes.num_judgments, votes.num_unparseable) == (3, 0)


def test_empty_and_unscored_candidates_are_never_picked_and_equal_scores_tie():
    run = LikelihoodRun(["", "x", "y", "z"])
    assert run.requests == [1, 2, 3]
    run.feed([L(-3.0, 3), L(0.0, 0), L(-6.0, 2)])  # "y" could not be scored (its prompt was too long)
    _, scores, decided = run.decide()
    assert scores == [-math.inf, -1.0, -math.inf, -3.0]
    assert decided == (Decision.PAIR, 1, 3, 2.0)
    assert run.decide().votes.num_unparseable == 1

    tied = LikelihoodRun(["x", "y", "z"])
    tied.feed([L(-2.0, 2), L(-1.0, 1), L(-3.0, 3)])  # every mean is -1: no preference, roll back
    assert tied.decide().decision == (Decision.TIE, 0, 2, 0.0)

    same = LikelihoodRun(["x", " x", ""])
    same.feed([L(-1.0, 1)])
    assert same.decide().decision == (Decision.NO_PAIR, 0, None, 0.0)

    empty = LikelihoodRun(["", " "])
    assert empty.requests == []
    empty.feed([])
    assert empty.decide().decision.decision is Decision.TIE

    with pytest.raises(ValueError, match="got 1 likelihoods for 2 candidates"):
        LikelihoodRun(["x", "y"]).feed([L(-1.0, 1)])


def test_a_search_scored_by_the_fake_engine_keeps_right_steps_and_records_their_scores():
    problem = load_problems("embedded:arith", split="train", seed=None, limit=1).problems[0]
    engine = ArithEngine([problem], candidates=lambda r, right: (off_by_one(right), right, right, off_by(right, 3)))
    search = ProblemSearch(problem, iteration=2, max_steps=20, max_rollbacks=2, judge_mode=JudgeMode.LIKELIHOOD)
    while not search.done:
        (candidates,) = engine.propose([search.propose_request()], num_candidates=4, temperature=1.0, top_p=1.0,
                                       max_tokens=32, seed=None)  # fmt: skip
        search.on_candidates(candidates)
        assert search.phase is Phase.JUDGE
        requests = search.score_requests()
        # One prefill per distinct text, each under the prompt that proposed it.
        assert [r.step for r in requests] == [candidates.steps[i] for i in (0, 1, 3)]
        assert all((r.question, r.prefix, r.step_index) == (problem.question, search.prefix, search.step_index)
                   for r in requests)  # fmt: skip
        search.on_likelihoods(engine.score_steps(requests))
    assert search.outcome is Outcome.FINAL_ANSWER and search.steps == [s.strip() for s in problem.steps]
    assert search.num_judgments == 3 * len(problem.steps) and search.num_rollbacks == 0
    pairs = search.finished_pairs()
    assert len(pairs) == len(problem.steps)
    for k, pair in enumerate(pairs):
        assert (pair.chosen, pair.judge_mode) == (problem.steps[k].strip(), "likelihood")
        # The worst of the two wrong steps (equal scores): the higher index, off by 3.
        assert pair.rejected == off_by(problem.steps[k], 3).strip()
        assert (pair.chosen_score, pair.rejected_score, pair.margin) == (-0.5, -2.0, 1.5)
        assert pair.candidate_scores == [-2.0, -0.5, -0.5, -2.0]


def test_a_round_of_empty_candidates_rolls_back_without_asking_the_engine():
    search = ProblemSearch(Problem("p", "What is 2+2?", "4"), iteration=1, max_steps=4, max_rollbacks=1,
                           judge_mode=JudgeMode.LIKELIHOOD)  # fmt: skip
    search.on_candidates(_candidates(("", " ")))
    assert search.phase is Phase.PROPOSE and search.num_rollbacks == 1
    search.on_candidates(_candidates(("", "")))
    assert search.outcome is Outcome.ABANDONED and search.finished_pairs() == []


def _candidates(steps):
    from psr_ray.engines.api import Candidates

    return Candidates(steps=steps, num_tokens=0, policy_version=1)


def wrong_first(request, right: str) -> tuple[str, ...]:
    """The reference step after two wrong ones (off by one, off by two)."""
    return (off_by_one(right), off_by(right, 2), right)


@pytest.mark.ray
def test_the_scheduler_sends_likelihood_rounds_to_score_steps(ray_cluster):
    ray = ray_cluster
    from psr_ray.engines.pool import EnginePool
    from psr_ray.search.scheduler import SearchScheduler

    problems = load_problems("embedded:arith", split="train", seed=None, limit=6).problems
    cfg = dataclasses.replace(
        PSRConfig(),
        rollout=RolloutConfig(num_candidates=3),
        judge=JudgeConfig(mode="likelihood"),
        search=SearchConfig(max_steps=6, max_rollbacks=2, max_problems_in_flight=4),
    )
    sys.modules["ray"].cloudpickle.register_pickle_by_value(sys.modules[__name__])
    actor = ray.remote(ArithEngine).options(num_cpus=0).remote(problems, candidates=wrong_first)
    ray.get(actor.ready.remote())
    rollout, judge = EnginePool("rollout", [actor], max_restarts=0), EnginePool("judge", [actor], max_restarts=0)
    finished = []
    stats = SearchScheduler(cfg, iteration=1, policy_version=1, rollout=rollout, judge=judge).run(
        problems, finished.append
    )
    ray.kill(actor)
    num_steps = sum(len(p.steps) for p in problems)
    assert stats.problems_correct == stats.problems_final_answer == len(problems) and stats.rollbacks == 0
    assert stats.judge_calls == 3 * num_steps and stats.judge_tokens == 0 and stats.unparseable == 0
    pairs = [pair for result in finished for pair in result.pairs]
    by_id = {p.problem_id: p for p in problems}
    assert len(pairs) == num_steps
    for pair in pairs:
        assert label_steps(by_id[pair.problem_id], pair.prefix, [pair.chosen, pair.rejected]) == [True, False]
        assert (pair.judge_mode, pair.num_judgments, pair.chosen_score, pair.rejected_score) == (
            "likelihood", 3, -0.5, -2.0)  # fmt: skip


def test_score_requests_carry_the_step_index_of_the_prefix():
    from psr_ray.init_data.labelled import LabelledPair, score_requests

    pairs = [LabelledPair("q", "", "a", "b"), LabelledPair("q2", "Step 1: x\nStep 2: y\n", "c", "d")]
    assert score_requests(pairs) == [ScoreRequest("q", "", 1, "a"), ScoreRequest("q", "", 1, "b"),
                                     ScoreRequest("q2", "Step 1: x\nStep 2: y\n", 3, "c"),
                                     ScoreRequest("q2", "Step 1: x\nStep 2: y\n", 3, "d")]  # fmt: skip


@pytest.mark.ray
def test_held_out_judge_accuracy_of_the_likelihood_judge(ray_cluster):
    from psr_ray.core.steps import join_steps
    from psr_ray.init_data.labelled import LabelledPair, measure_judge

    problems = load_problems("embedded:arith", split="train", seed=None, limit=5).problems
    pairs = [LabelledPair(p.question, join_steps(p.steps[:k]), p.steps[k], off_by_one(p.steps[k]))
             for p in problems for k in range(len(p.steps))]  # fmt: skip
    pairs[0] = pairs[0]._replace(good_step=pairs[0].bad_step, bad_step=pairs[0].good_step)  # one pair the wrong way
    actor = ray_cluster.remote(ArithEngine).options(num_cpus=0).remote(problems, candidates=wrong_first)
    scores = measure_judge([actor, actor], pairs, mode="likelihood", max_tokens=1, batch_size=4)
    ray_cluster.kill(actor)
    assert (scores.num_judgments, scores.num_pairs_right, scores.parse_rate, scores.share_a) == (
        2 * len(pairs), len(pairs) - 1, 1.0, 0.5)  # fmt: skip
