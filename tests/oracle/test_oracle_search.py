"""`judge.mode: oracle` (the ablation) in the real scheduler on a real local Ray: judge rounds are decided by
the exact step check in the driver, no judge engine is called, and every pair prefers a right step."""

from __future__ import annotations

import dataclasses
import sys

import pytest

from psr_ray.config import JudgeConfig, PSRConfig, RolloutConfig, SearchConfig
from psr_ray.data.problems import load_problems
from psr_ray.engines.pool import EnginePool
from psr_ray.oracle.judge import label_steps
from psr_ray.pipeline.preflight import validate
from psr_ray.search.scheduler import SearchScheduler
from psr_ray.testing.arith_engine import ArithEngine, off_by_one

pytestmark = pytest.mark.ray


def candidates(request, right: str) -> tuple[str, ...]:
    """At step k of a problem: the reference step (right), the same step with the result off by one (wrong)
    and, on odd problems, the reference step once more (a duplicate). At step 1 of a question starting with a
    vowel every candidate is right (different texts)."""
    if request.step_index == 1 and request.question[0] in "AEIOU":
        return (right, right + " Done.", "So: " + right)
    wrong = off_by_one(right)
    return (wrong, right, right if len(request.question) % 2 else wrong + " So.")


def test_oracle_mode_judges_in_the_driver_and_picks_right_steps(ray_cluster):
    ray = ray_cluster
    problems = load_problems("embedded:arith", split="train", seed=None, limit=12).problems
    cfg = dataclasses.replace(
        PSRConfig(),
        rollout=RolloutConfig(num_candidates=3),
        judge=JudgeConfig(mode="oracle"),
        search=SearchConfig(max_steps=6, max_rollbacks=2, max_problems_in_flight=8),
    )
    cloudpickle = sys.modules["ray"].cloudpickle
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    actor = ray.remote(ArithEngine).options(num_cpus=0).remote(problems, candidates=candidates)
    ray.get(actor.ready.remote())
    rollout, judge = EnginePool("rollout", [actor], max_restarts=0), EnginePool("judge", [actor], max_restarts=0)
    finished = []
    stats = SearchScheduler(cfg, iteration=1, policy_version=1, rollout=rollout, judge=judge).run(
        problems, finished.append
    )
    ray.kill(actor)
    assert stats.judge_batches == 0 and stats.unparseable == 0
    assert stats.oracle_draws > 0  # the two wrong candidates tie
    assert stats.problems_correct == stats.problems_final_answer == 12
    # Only right candidates: the step advances without a pair and nothing rolls back.
    all_right = [p for p in problems if p.question[0] in "AEIOU"]
    assert all_right and stats.rollbacks == 0 and stats.steps_without_pair == len(all_right)
    by_id = {p.problem_id: p for p in problems}
    pairs = [pair for result in finished for pair in result.pairs]
    assert len(pairs) == sum(len(p.steps) for p in problems) - len(all_right)
    for pair in pairs:
        problem = by_id[pair.problem_id]
        assert pair.judge_mode == "oracle"
        assert label_steps(problem, pair.prefix, [pair.chosen, pair.rejected]) == [True, False]


def test_oracle_mode_needs_the_built_in_task():
    cfg = dataclasses.replace(PSRConfig(), judge=JudgeConfig(mode="oracle"))
    with pytest.raises(ValueError, match="judge.mode=oracle .* data.source=embedded:arith"):
        validate(cfg, check_paths=False)
    ok = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, source="embedded:arith-3"))
    assert validate(ok, check_paths=False) is ok
