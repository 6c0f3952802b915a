"""The search scheduler on a real local Ray with deterministic fake engine actors (same methods as
psr_ray.engines.actor.EngineActor), then once with the real tiny-model vLLM engines."""

from __future__ import annotations

import dataclasses
import time
from collections import Counter

import pytest

from psr_ray.config import JudgeConfig, PSRConfig, RolloutConfig, SearchConfig
from psr_ray.data.pairs_io import PairWriter, read_manifest, read_pairs
from psr_ray.data.problems import Problem
from psr_ray.data.schema import check_table
from psr_ray.engines.api import Candidates, Judgment
from psr_ray.engines.pool import EnginePool
from psr_ray.pipeline.search_stage import generate_pairs
from psr_ray.search.problem import Outcome
from psr_ray.search.scheduler import SearchScheduler

pytestmark = pytest.mark.ray


class FakeEngine:
    """Candidates `"<quality> <problem> s<k> c<j>"`; step 3 of a problem carries a boxed answer. A question
    containing "tie" proposes candidates of equal quality at step 2 on even seeds (a tie: a rollback). The
    judge prefers the higher leading digit; equal digits are unparseable. Each call sleeps a little so calls
    overlap."""

    def __init__(self, delay: float = 0.05):
        self.delay = delay

    def propose(self, requests, *, num_candidates, temperature, top_p, max_tokens, seed):
        time.sleep(self.delay)
        out = []
        for i, r in enumerate(requests):
            k = r.step_index
            request_seed = seed[i] if isinstance(seed, list) else seed + i * num_candidates
            if "tie" in r.question and k == 2 and request_seed % 2 == 0:
                steps = tuple(f"5 same c{j}" for j in range(num_candidates))
            else:
                tag = f"{r.question.split()[0]} s{k}"
                steps = tuple(
                    f"{(j * 7 + k) % num_candidates} {tag} c{j}" + (r" \boxed{3}" if k == 3 else "")
                    for j in range(num_candidates)
                )
            out.append(Candidates(steps=steps, num_tokens=5 * num_candidates, policy_version=1))
        return out

    def judge(self, requests, *, mode, temperature, max_tokens):
        time.sleep(self.delay)
        out = []
        for r in requests:
            a, b = int(r.step_a.split()[0]), int(r.step_b.split()[0])
            verdict = "A" if a > b else "B" if b > a else "unparseable"
            out.append(Judgment(verdict, {"A": 1.0, "B": 0.0}.get(verdict, 0.5), "", 2, 1))
        return out

    def pid(self):
        import os

        return os.getpid()


def make_cfg(**search) -> PSRConfig:
    return dataclasses.replace(
        PSRConfig(),
        rollout=RolloutConfig(num_candidates=3, max_restarts=3),
        judge=JudgeConfig(max_restarts=3),
        search=SearchConfig(**{"max_steps": 5, "max_rollbacks": 3, "max_problems_in_flight": 16, **search}),
    )


def fake_pool(ray, role: str, n: int, delay: float = 0.05) -> EnginePool:
    import sys

    from ray import cloudpickle

    # Workers cannot import this test module by name: ship the fake class by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    remote = ray.remote(FakeEngine).options(num_cpus=0, max_restarts=3, max_task_retries=0)
    actors = [remote.remote(delay) for _ in range(n)]
    ray.get([a.pid.remote() for a in actors])
    return EnginePool(role, actors, max_restarts=3)


def problems(n: int, tie_every: int = 5) -> list[Problem]:
    return [Problem(f"p{i}", f"q{i} " + ("tie" if i % tie_every == 0 else "plain"), "3") for i in range(n)]


def test_many_problems_in_flight_survive_killed_actors_exactly_once(ray_cluster, tmp_path):
    ray = ray_cluster
    cfg = make_cfg()
    rollout, judge = fake_pool(ray, "rollout", 2), fake_pool(ray, "judge", 2)
    scheduler = SearchScheduler(cfg, iteration=0, policy_version=1, rollout=rollout, judge=judge)
    writer = PairWriter(str(tmp_path), 0, flush_pairs=8)
    finished: list = []
    killed: list[str] = []
    old_pids = ray.get([rollout.actors[0].pid.remote(), judge.actors[1].pid.remote()])

    def on_finished(result):
        writer.add(result.problem_id, result.pairs)
        finished.append(result)

    def on_tick():
        # Once some problems are done, kill one engine of each pool while it has calls in flight.
        if len(finished) >= 4:
            for pool, index in ((scheduler.rollout, 0), (scheduler.judge, 1)):
                if pool.role not in killed and pool.in_flight[index] > 0:
                    ray.kill(pool.actors[index], no_restart=False)
                    killed.append(pool.role)

    bad = [Problem("empty", "   "), Problem("long", "x" * (cfg.data.max_problem_chars + 1))]
    stats = scheduler.run(problems(40) + bad, on_finished, on_tick)
    writer.close()

    assert sorted(killed) == ["judge", "rollout"]
    assert stats.requeued_requests > 0
    # Restarted by Ray: new processes behind the same handles.
    assert ray.get([rollout.actors[0].pid.remote(), judge.actors[1].pid.remote()]) != old_pids
    ids = Counter(r.problem_id for r in finished)
    assert ids == Counter(f"p{i}" for i in range(40))  # each exactly once; the two bad ones skipped
    assert stats.problems_skipped == 2
    # One problem per call (a judge round: 6 comparisons), many calls on an engine at once: it batches them.
    assert stats.largest_propose_batch == 1 and stats.largest_judge_batch == 6 and stats.most_calls_on_an_engine > 1
    table = read_pairs(str(tmp_path), 0)
    check_table(table)
    pair_ids = table.column("pair_id").to_pylist()
    assert len(pair_ids) == len(set(pair_ids)) == stats.pairs
    assert sorted(read_manifest(writer.directory)["done_problems"]) == sorted(ids)
    rows = table.to_pylist()
    assert all(r["chosen"] != r["rejected"] and r["chosen_score"] > r["rejected_score"] for r in rows)
    # Every problem that finished with a final answer gave exactly steps 1..3.
    for result in finished:
        if result.outcome is Outcome.FINAL_ANSWER:
            assert [p.step_index for p in result.pairs] == [1, 2, 3]
            # Step 1 was committed (step 2 decided) before the answer was known; steps 2-3 left with it.
            assert [p.answer_correct for p in result.pairs] == [None, True, True]
    assert stats.problems_final_answer + stats.problems_abandoned + stats.problems_max_steps == 40
    assert stats.rollbacks > 0  # the "tie" problems rolled back at least once
    for a in rollout.actors + judge.actors:
        ray.kill(a)


def test_generate_pairs_summary_and_resume_skip_finished_problems(ray_cluster, tmp_path):
    ray = ray_cluster
    cfg = make_cfg(max_problems_in_flight=8)
    rollout, judge = fake_pool(ray, "rollout", 1, 0.0), fake_pool(ray, "judge", 1, 0.0)

    def search(todo, iteration=2, **kwargs):
        return generate_pairs(cfg, todo, iteration=iteration, policy_version=1, rollout=rollout, judge=judge,
                              output_dir=str(tmp_path), **kwargs)  # fmt: skip

    first = search(problems(6))
    assert (first.problems_total, first.problems_resumed, first.problems_skipped) == (6, 0, 0)
    assert first.pairs == len(read_pairs(str(tmp_path), 2)) > 0
    assert first.generated_tokens > 0 and first.tokens_per_s > 0 and first.unparseable_rate >= 0
    margins = sorted(read_pairs(str(tmp_path), 2).column("margin").to_pylist())
    assert (first.margin_min, first.margin_max) == (margins[0], margins[-1]) and margins[0] >= 1.0
    assert read_manifest(first.pairs_dir)["complete"] is True

    seen = []
    more = [Problem(f"p{i}", f"q{i} plain", "3") for i in range(10)]
    second = search(more, on_pairs=seen.append)
    assert second.problems_resumed == 6
    assert sorted(r.problem_id for r in seen) == [f"p{i}" for i in range(6, 10)]
    pair_ids = read_pairs(str(tmp_path), 2).column("pair_id").to_pylist()
    assert len(pair_ids) == len(set(pair_ids)) == first.pairs + second.pairs == second.pairs_total
    with pytest.raises(ValueError, match="appears twice"):
        search(problems(2) + problems(1), iteration=3)
    for a in rollout.actors + judge.actors:
        ray.kill(a)


def test_a_search_stopped_mid_problem_resumes_from_the_committed_steps(ray_cluster, tmp_path):
    """Pairs are written as their steps are committed, before their problem ends; a search stopped then and
    run again continues those problems from the manifest's checkpoints: the pairs equal an undisturbed run's,
    none twice."""
    import threading

    from psr_ray.pipeline.search_stage import SearchStopped

    ray = ray_cluster
    cfg = make_cfg(max_problems_in_flight=4)
    rollout, judge = fake_pool(ray, "rollout", 1, 0.01), fake_pool(ray, "judge", 1, 0.01)

    def search(folder, **kwargs):
        return generate_pairs(cfg, problems(8, tie_every=2), iteration=1, policy_version=1, rollout=rollout,
                              judge=judge, output_dir=str(folder), flush_pairs=1, **kwargs)  # fmt: skip

    search(tmp_path / "whole")
    stop, seen_open = threading.Event(), []

    def on_turn():
        manifest = read_manifest(tmp_path / "cut" / "pairs" / "iter_1")
        if manifest.get("open_problems") and not stop.is_set():
            seen_open.append((dict(manifest["open_problems"]), list(manifest["done_problems"])))
            stop.set()

    with pytest.raises(SearchStopped):
        search(tmp_path / "cut", stop=stop, on_turn=on_turn)
    (open_problems, done), cut = seen_open[0], read_pairs(str(tmp_path / "cut"), 1).to_pylist()
    # Pairs of a problem not yet done reached the manifest (the trainer's stream) with its checkpoint.
    assert any(row["problem_id"] in open_problems and row["problem_id"] not in done for row in cut)
    search(tmp_path / "cut")
    whole = {r["pair_id"]: r for r in read_pairs(str(tmp_path / "whole"), 1).to_pylist()}
    resumed = read_pairs(str(tmp_path / "cut"), 1).to_pylist()
    assert len(resumed) == len({r["pair_id"] for r in resumed})  # none twice
    assert {r["pair_id"]: r for r in resumed} == whole
    assert read_manifest(tmp_path / "cut" / "pairs" / "iter_1")["open_problems"] == {}
    for a in rollout.actors + judge.actors:
        ray.kill(a)


def test_generate_pairs_with_real_tiny_engines(ray_cluster, tiny_model_dir, tmp_path):
    """The real vLLM engines (tiny random model): direct-mode judge, one order per pair. The random judge
    always prefers one position, so under both orders (or one order with 3 candidates, where each is shown
    first once) every score ties and everything rolls back; 4 candidates in one order give pairs."""
    from concurrent.futures import ThreadPoolExecutor

    from psr_ray.config import ModelConfig
    from psr_ray.data.pairs_io import stream_pairs_dataset
    from psr_ray.engines.pool import start_engine_pool

    cfg = dataclasses.replace(
        PSRConfig(),
        model=ModelConfig(max_model_len=512),
        rollout=RolloutConfig(num_candidates=4, max_step_tokens=12),
        judge=JudgeConfig(mode="direct", both_orders=False),
        # The random judge's margins come from positions, not content: far below the default minimum.
        search=SearchConfig(max_steps=2, max_rollbacks=2, max_problems_in_flight=4, min_score_margin=0.01),
    )
    with ThreadPoolExecutor(2) as pool:  # both engines start at once
        rollout_future = pool.submit(start_engine_pool, cfg, "rollout", tiny_model_dir)
        judge = start_engine_pool(cfg, "judge", tiny_model_dir)
        rollout = rollout_future.result()
    try:
        questions = [
            "Tom has 3 apples and buys 4 more. How many?",
            "What is 6 times 7?",
            "A train goes 60 km in 1 hour. How far in 2 hours?",
            "Half of 18 is?",
        ]
        todo = [Problem(f"g{i}", q, None) for i, q in enumerate(questions)]
        summary = generate_pairs(cfg, todo, iteration=1, policy_version=0, rollout=rollout, judge=judge,
                                 output_dir=str(tmp_path))  # fmt: skip
    finally:
        for actor in rollout.actors + judge.actors:
            ray_cluster.kill(actor)
    assert summary.problems_done + summary.problems_abandoned == 4
    assert summary.candidates >= 4 * 4 and summary.judge_calls >= 4 * 6
    assert summary.generated_tokens > 0 and summary.mean_propose_batch == 1 and summary.most_calls_on_an_engine > 1
    table = read_pairs(str(tmp_path), 1)
    assert table.num_rows == summary.pairs > 0
    rows = table.to_pylist()
    assert all(r["chosen"] != r["rejected"] and r["policy_version"] == 0 and r["judge_mode"] == "direct" for r in rows)
    assert all(r["margin"] == pytest.approx(r["chosen_score"] - r["rejected_score"], abs=1e-6) for r in rows)
    assert all(r["margin"] >= 0.01 for r in rows)
    assert len({r["pair_id"] for r in rows}) == len(rows)
    streamed = [r["pair_id"] for r in stream_pairs_dataset(str(tmp_path), 1).iter_rows()]
    assert sorted(streamed) == sorted(r["pair_id"] for r in rows)


def test_a_judge_with_no_engines_of_its_own_runs_on_the_rollout_engines(ray_cluster):
    # judge.num_engines: 0 — the judge pool is the named rollout engines; the search runs on them alone.
    import sys

    from ray import cloudpickle

    from psr_ray.engines.pool import start_engine_pool

    ray = ray_cluster
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cfg = dataclasses.replace(
        make_cfg(),
        rollout=RolloutConfig(num_engines=2, num_candidates=3, max_restarts=3),
        judge=JudgeConfig(num_engines=0, max_restarts=3),
    )
    remote = ray.remote(FakeEngine)
    actors = [remote.options(num_cpus=0, max_task_retries=0, name=f"psr-rollout-{i}").remote(0.01) for i in range(2)]
    try:
        rollout = EnginePool("rollout", actors, max_restarts=3)
        judge = start_engine_pool(cfg, "judge", "unused: no engine is started")
        assert judge.actors == actors and judge.names == ["psr-rollout-0", "psr-rollout-1"]
        scheduler = SearchScheduler(cfg, iteration=0, policy_version=1, rollout=rollout, judge=judge)
        finished: list = []
        stats = scheduler.run(problems(6), finished.append, lambda: None)
        assert sorted(r.problem_id for r in finished) == [f"p{i}" for i in range(6)] and stats.pairs > 0
    finally:
        for actor in actors:
            ray.kill(actor)


class NoRoomEngine(FakeEngine):
    """A FakeEngine whose restart never completes: the stand-in for an engine whose node is gone and that no
    other node can host (Ray keeps it RESTARTING; every call to it fails at once)."""

    def __init__(self, delay: float = 0.05):
        import ray

        if ray.get_runtime_context().was_current_actor_reconstructed:
            time.sleep(3600)
        super().__init__(delay)


def test_an_engine_that_never_comes_back_fails_the_search_within_its_bound(ray_cluster):
    import sys

    from ray import cloudpickle

    ray = ray_cluster
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cfg = make_cfg()
    bound = 4.0
    gone = ray.remote(NoRoomEngine).options(num_cpus=0, max_restarts=3, max_task_retries=0).remote(0.2)
    ray.get(gone.pid.remote())
    rollout = EnginePool("rollout", [gone], max_restarts=3, names=["psr-rollout-0"], unavailable_timeout_s=bound)
    judge = fake_pool(ray, "judge", 1)
    scheduler = SearchScheduler(cfg, iteration=0, policy_version=1, rollout=rollout, judge=judge)
    finished: list = []
    killed_at: list[float] = []

    def on_tick():
        if finished and not killed_at:
            ray.kill(gone, no_restart=False)
            killed_at.append(time.monotonic())

    try:
        with pytest.raises(RuntimeError, match=r"rollout engine psr-rollout-0 has been unavailable for \d+ s "
                           r"\(run.engine_unavailable_timeout_s=4"):  # fmt: skip
            scheduler.run(problems(30), finished.append, on_tick)
        assert killed_at and time.monotonic() - killed_at[0] < bound + 30  # bounded, not 149 retries forever
        assert scheduler.stats.requeued_requests > 0
    finally:
        ray.kill(gone, no_restart=True)
        for actor in judge.actors:
            ray.kill(actor)
