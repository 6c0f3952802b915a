"""The run folder's lock (across real processes, freed by SIGKILL), the resumed run's config, the zero-pair
rule, durable writes, and the kill windows' arming (in a real child process that blocks until killed)."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from psr_ray import config as C
from psr_ray.pipeline.run_dir import (
    RESUMABLE,
    RunDirLock,
    check_resume,
    check_search_pairs,
    check_writable,
    resume_config,
)
from psr_ray.runtime import kill_windows

HOLD_LOCK = "import sys, time\nfrom psr_ray.pipeline.run_dir import RunDirLock\nRunDirLock(sys.argv[1])\nprint('held', flush=True)\ntime.sleep(600)\n"


def test_the_lock_excludes_another_process_and_dies_with_it(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(
            ValueError, match=rf"^{tmp_path} is in use by another psr-ray process \(.*\"pid\": {holder.pid}"
        ):
            RunDirLock(tmp_path)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    RunDirLock(tmp_path).release()  # the kernel dropped the dead holder's lock: no stale lock after SIGKILL


def write_run(folder: Path, *overrides: str) -> C.PSRConfig:
    model = folder / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text('{"model_type": "llama", "max_position_embeddings": 4096}')
    (model / "model.safetensors").write_text("x")
    (model / "tokenizer.json").write_text("{}")
    cfg = C.load([], [f"model.path={model}", f"run.output_dir={folder}", *overrides])
    (folder / "state.json").write_text(json.dumps({"config": cfg.to_dict(), "iterations": {}}))
    return cfg


def test_resume_applies_resumable_overrides_and_refuses_the_rest(tmp_path):
    stored = write_run(tmp_path)
    cfg = resume_config(str(tmp_path), ["run.num_iterations=5", "run.engine_call_timeout_s=60"])
    assert (cfg.run.num_iterations, cfg.run.engine_call_timeout_s) == (5, 60.0)
    assert cfg.rollout == stored.rollout
    with pytest.raises(ValueError, match=r"rollout.num_candidates, trainer.beta cannot change in a resumed run"):
        resume_config(str(tmp_path), ["trainer.beta=0.1", "rollout.num_candidates=3"])
    with pytest.raises(ValueError, match=r"^--resume .*: rollout.num_candidates must be of type int"):
        resume_config(str(tmp_path), ["rollout.num_candidates=x"])
    with pytest.raises(ValueError, match=r"invalid config: run.num_iterations must be >= 1"):
        resume_config(str(tmp_path), ["run.num_iterations=0"])
    assert all(key.split(".")[0] in ("run", "rollout", "judge", "search", "trainer") for key in RESUMABLE)


def test_a_job_resubmitted_with_run_resume_auto_continues_a_run_started_without_it(tmp_path):
    """`run.resume=auto` says how the job starts, not what it computes: the run started without it goes on."""
    stored = write_run(tmp_path)
    resumed = C.load([], [f"model.path={stored.model.path}", f"run.output_dir={tmp_path}", "run.resume=auto"])
    check_resume(stored, resumed, str(tmp_path))  # no ValueError
    assert resume_config(str(tmp_path), ["run.resume=auto"]).run.resume == "auto"


def test_the_write_probe_is_removed_when_the_disk_is_full(tmp_path, monkeypatch):
    def full_disk(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(
        ValueError, match=rf"^run.output_dir {tmp_path}: cannot write there \(No space left on device\)$"
    ):
        check_writable(tmp_path)
    assert list(tmp_path.iterdir()) == []  # no .psr-ray-write-test-<pid> left behind


def test_resume_validates_the_stored_config_as_it_is_now(tmp_path):
    write_run(tmp_path)
    state = json.loads((tmp_path / "state.json").read_text())
    state["config"]["model"]["path"] = str(tmp_path / "moved_away")
    (tmp_path / "state.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match=r"model.path '.*moved_away' does not exist"):
        resume_config(str(tmp_path))
    state["config"]["trainer"]["no_such_field"] = 1
    (tmp_path / "state.json").write_text(json.dumps(state))
    with pytest.raises(
        ValueError, match=r"state.json: its stored config is not valid for this psr_ray \(unknown config key"
    ):
        resume_config(str(tmp_path))


def test_an_iteration_without_pairs_fails_with_the_reason():
    summary = {"pairs_total": 0, "problems_total": 4, "problems_abandoned": 4, "rollbacks": 8, "problems_skipped": 0,
               "unparseable_rate": 1.0, "judge_calls": 48}  # fmt: skip
    with pytest.raises(ValueError) as err:
        check_search_pairs(2, summary, policy_version=2)
    assert str(err.value) == (
        "iteration 2 produced no step pairs: 4 of 4 problems were abandoned after 8 rollbacks (all candidates tied), "
        "0 skipped, 100% of 48 verdicts unparseable; nothing to train on, so the policy stays at version 2. Start a "
        "new run with settings that let the judge decide (e.g. judge.mode=direct or more search.max_rollbacks)"
    )
    check_search_pairs(2, {**summary, "pairs_total": 1}, policy_version=2)


def test_write_atomic_leaves_the_new_file_whole_and_no_temp(tmp_path):
    from psr_ray.runtime.durable import fsync_tree, write_atomic

    write_atomic(tmp_path / "a.json", '{"v": 1}')
    write_atomic(tmp_path / "a.json", lambda tmp: tmp.write_text('{"v": 2}'))
    assert json.loads((tmp_path / "a.json").read_text()) == {"v": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
    assert fsync_tree(tmp_path) == 1


def test_write_atomic_writers_keep_their_own_temps_and_a_failed_write_leaves_the_old_file(tmp_path):
    from psr_ray.runtime.durable import write_atomic

    write_atomic(tmp_path / "a.json", '{"v": 1}')
    temps: list = []

    def second_writer(tmp):  # another writer of the same path, while the first has its temp open
        tmp.write_text('{"v": 3}')
        write_atomic(tmp_path / "a.json", lambda other: (temps.append(other), other.write_text('{"v": 2}')))
        temps.append(tmp)

    write_atomic(tmp_path / "a.json", second_writer)
    assert temps[0] != temps[1] and all(t.name.endswith(".tmp") for t in temps)
    assert json.loads((tmp_path / "a.json").read_text()) == {"v": 3}  # the last rename wins, whole

    def failing(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(tmp_path / "a.json", failing)
    assert json.loads((tmp_path / "a.json").read_text()) == {"v": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]  # no temp left behind


def test_kill_windows_are_inert_unless_armed(tmp_path, monkeypatch):
    monkeypatch.delenv(kill_windows.ENV, raising=False)
    kill_windows.reached("eval")  # returns at once
    monkeypatch.setenv(kill_windows.ENV, str(tmp_path))
    kill_windows.reached("eval")  # nothing armed
    (tmp_path / kill_windows.ARMED).write_text("eval@5\nstate.write\n")
    kill_windows.reached("eval")  # armed for another occurrence
    with pytest.raises(AssertionError):
        kill_windows.reached("no.such.window")
    assert not list(tmp_path.glob("ready.*"))


def test_an_armed_window_blocks_its_process_until_killed(tmp_path):
    (tmp_path / kill_windows.ARMED).write_text("state.write@2\n")
    code = ("from psr_ray.runtime import kill_windows\nfor i in range(3):\n    kill_windows.reached('state.write')\n"
            "    print(i, flush=True)\n")  # fmt: skip
    env = {**os.environ, kill_windows.ENV: str(tmp_path)}
    child = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    try:
        ready = kill_windows.ready_file(tmp_path, "state.write")
        deadline = time.monotonic() + 60
        while not ready.is_file() and time.monotonic() < deadline:
            time.sleep(0.05)
        info = json.loads(ready.read_text())
        assert (info["pid"], info["window"], info["occurrence"]) == (child.pid, "state.write", 2)
        time.sleep(0.5)
        assert child.poll() is None  # waiting in the window
    finally:
        child.send_signal(signal.SIGKILL)
    assert child.stdout.read() == "0\n"  # killed inside its 2nd write: the rest never ran
