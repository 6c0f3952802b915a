"""The output folder of a run (or of `psr-ray generate` / `train`): one driver at a time, writable before
anything starts, and the config a resumed run continues with.

The lock is an `flock` on `<folder>/.psr-ray.lock`, held for the driver's life: a second driver, or a job
resubmitted while the first still runs, gets a clear error instead of racing on the manifest and
`state.json`. The kernel drops the lock when the holder dies however it dies (SIGKILL included), so a
killed run never leaves a stale lock. `flock` is per host: on a shared filesystem two drivers on different
hosts are kept apart only where the filesystem supports it (NFSv4 and Lustre do).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from psr_ray.config import PSRConfig, UserError, from_dict, load
from psr_ray.pipeline.preflight import validate
from psr_ray.pipeline.run_state import RunState

LOCK_FILE = ".psr-ray.lock"

# What `psr-ray run --resume DIR key=value` may change: where and how fast the run goes, never what its
# finished stages computed (the pairs do not depend on batching or on which engine answers: seeds are
# per request). run.resume is how the job was started, not what it computes.
RESUMABLE = frozenset({
    "run.num_iterations", "run.ray_address", "run.resume", "run.wandb_mode", "run.wandb_project", "run.name",
    "run.cache_dir", "run.engine_start_timeout_s", "run.engine_call_timeout_s", "run.engine_unavailable_timeout_s",
    "run.autoscaling", "run.malloc_mmap_threshold_mib",
    "rollout.num_engines", "rollout.num_cpus_per_engine", "rollout.cpu_kv_cache_gib", "rollout.max_restarts",
    "rollout.cpu_kv_block_size", "judge.cpu_kv_block_size",
    "rollout.gpu_memory_utilization", "judge.num_engines", "judge.num_cpus_per_engine", "judge.cpu_kv_cache_gib",
    "judge.max_restarts", "judge.gpu_memory_utilization", "search.max_problems_in_flight", "search.flush_pairs",
    "trainer.max_failures", "trainer.num_cpus_per_worker", "trainer.gradient_checkpointing", "trainer.zero3_buffer_numel",
    "trainer.share_prompt",
})  # fmt: skip


class RunDirLock:
    """An exclusive lock on an output folder (see the module doc); `release()` or process exit frees it."""

    def __init__(self, folder: str | os.PathLike, *, command: str = "run"):
        self.folder = Path(folder).expanduser()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._fd: int | None = os.open(self.folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise UserError(f"output folder {self.folder}: cannot create it or its lock ({err.strerror})") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 4096, 0).decode(errors="replace").strip() or "unknown process"
            os.close(self._fd)
            self._fd = None
            raise UserError(
                f"{self.folder} is in use by another psr-ray process ({holder}); two drivers on one folder would "
                "race on its pairs and state.json: wait for it to end or stop it, or use another output folder"
            ) from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                "since": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
        try:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, json.dumps(info).encode(), 0)
        except OSError as err:  # a full disk
            self.release()
            raise UserError(f"output folder {self.folder}: cannot write there ({err.strerror})") from None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def check_writable(folder: str | os.PathLike, field: str = "run.output_dir") -> None:
    """A small file written, fsynced and removed: a read-only or missing mount fails here, before Ray starts,
    naming the folder. (A disk that fills up later fails its write with the OS error, naming the file; every
    commit point is atomic, so what was committed before stays intact.)"""
    probe = Path(folder).expanduser() / f".psr-ray-write-test-{os.getpid()}"
    try:
        with probe.open("wb") as f:
            f.write(b"x" * 4096)
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as err:
        with contextlib.suppress(OSError):  # a full disk must not keep the probe
            probe.unlink()
        raise UserError(f"{field} {folder}: cannot write there ({err.strerror})") from None


def resume_config(resume_dir: str, overrides: list[str] | tuple[str, ...] = (),
                  config_paths: list[str] | None = None) -> PSRConfig:  # fmt: skip
    """The config `psr-ray run --resume DIR` continues with: the one stored in DIR/state.json, validated as
    it is now, with the `overrides` applied when they only touch RESUMABLE settings."""
    if config_paths:
        raise UserError(
            f"--resume {resume_dir} continues with the config stored in its state.json; drop --config "
            "(single key=value overrides of settings such as run.num_iterations or run.ray_address are allowed)"
        )
    stored = stored_config(resume_dir)
    try:
        cfg = load([], overrides, base=stored.to_dict())
    except ValueError as err:
        raise UserError(f"--resume {resume_dir}: {err}") from None
    check_resume(stored, cfg, resume_dir)
    return validate(cfg)


def stored_config(resume_dir: str) -> PSRConfig:
    """The config a run in `resume_dir` started with (a UserError naming the file if there is none)."""
    state = RunState(Path(resume_dir).expanduser())
    if not state.exists:
        raise UserError(f"--resume {resume_dir}: no state.json there (is it a run folder? a run that failed "
                        "to start leaves none); start a new run with `psr-ray run`")  # fmt: skip
    raw = state.data.get("config")
    if not isinstance(raw, dict):
        raise UserError(f"{state.path} holds no config; move it away to start this run over")
    try:
        return from_dict(raw)
    except ValueError as err:
        raise UserError(f"{state.path}: its stored config is not valid for this psr_ray ({err})") from None


def check_resume(stored: PSRConfig, cfg: PSRConfig, resume_dir: str) -> None:
    """Refuses a resumed config that differs from the stored one outside RESUMABLE."""
    changed = sorted(key for key in _flat(cfg) if _flat(cfg)[key] != _flat(stored).get(key))
    bad = [key for key in changed if key not in RESUMABLE]
    if bad:
        raise UserError(
            f"--resume {resume_dir}: {', '.join(bad)} cannot change in a resumed run (it would change what the run's "
            f"finished stages computed); start a new run, or change only: {', '.join(sorted(RESUMABLE))}"
        )


def _flat(cfg: PSRConfig) -> dict[str, Any]:
    return {f"{section.name}.{key}": value for section in dataclasses.fields(cfg)
            for key, value in getattr(cfg, section.name).__dict__.items()}  # fmt: skip


def check_search_pairs(iteration: int, summary: dict[str, Any], *, policy_version: int) -> None:
    """An iteration whose search committed no pair fails here, with the reason, instead of training zero
    steps and bumping the policy version."""
    if summary.get("pairs_total", 0) > 0:
        return
    total = summary.get("problems_total", 0)
    why = (
        f"{summary.get('problems_abandoned', 0)} of {total} problems were abandoned after "
        f"{summary.get('rollbacks', 0)} rollbacks (all candidates tied), {summary.get('problems_skipped', 0)} "
        f"skipped, {summary.get('unparseable_rate', 0.0):.0%} of {summary.get('judge_calls', 0)} verdicts unparseable"
    )
    raise UserError(
        f"iteration {iteration} produced no step pairs: {why}; nothing to train on, so the policy stays at "
        f"version {policy_version}. Start a new run with settings that let the judge decide (e.g. judge.mode=direct "
        "or more search.max_rollbacks)"
    )
