"""Real kills of a real `psr-ray run` (a subprocess on a shared Ray cluster) inside named windows
(`psr_ray.runtime.kill_windows`), resumed with `psr-ray run --resume`, and compared with an undisturbed run.

A launch arms up to two windows: a trainer worker is SIGKILLed when it reaches its window (Ray Train restarts
the worker group), the driver when it reaches its own; without a driver window the launch runs to the end.
The windows reach every process of the run through the job's runtime_env (`RAY_JOB_CONFIG_JSON_ENV_VAR`,
how `ray job submit` hands a driver its runtime_env), so the trainer workers and engines of a run on an
existing cluster see them too.

    tiny = write_inputs(model_dir, work, ray_address)          # problems (with bad lines) + config
    base = outcome(finish(tiny, work / "base", kill_dir))       # the undisturbed run
    launch(tiny, out, kill_dir, driver="search.after_flush")   # killed there
    done = finish(tiny, out, kill_dir, resume=True)            # --resume to the end
    compare_runs(base, outcome(out))                           # lost / duplicated / changed / trained
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from psr_ray.config import REPO_ROOT
from psr_ray.runtime import kill_windows

# The tiny driver run: one iteration of 4 problems, a Parquet part per finished problem (so parts are
# committed mid-search), a short eval. 4 problems x 3 steps = 12 pairs.
DRIVER_OVERRIDES = (
    "search.max_problems_in_flight=4",
    "search.flush_pairs=1",
    "trainer.max_failures=2",
    "eval.limit=2",
    "eval.max_tokens=16",
    "run.num_iterations=1",
    "run.prompts_per_iteration=[4]",
    "run.engine_start_timeout_s=600",
    "run.engine_call_timeout_s=600",
)

# Each window, armed on a fresh run (`@N`: the N-th time a process reaches it): iteration 1's eval is the
# second eval; state.json's 4th write records iteration 1's training (config, eval 0, search, train).
FRESH_RUN_WINDOWS = {
    "search.before_flush": "search.before_flush@1",
    "search.after_flush": "search.after_flush@1",
    "train.after_step": "train.after_step@1",
    "sync.after_push": "sync.after_push@1",
    "checkpoint.persist": "checkpoint.persist@1",
    "eval": "eval@2",
    "state.write": "state.write@4",
}

GOOD_QUESTIONS = [
    ("Tom has 3 apples and buys 4 more. How many apples?", "7"),
    ("What is 6 times 7?", "42"),
    ("Half of 18 is?", "9"),
    ("A box holds 5 pens. How many pens are in 3 boxes?", "15"),
]
BAD_LINES = [
    b'{"question": "broken json", ',
    json.dumps({"text": "no question field", "answer": "3"}).encode(),
    b'{"question": "caf\xe9 costs 4, two cost?", "answer": "8"}',
    json.dumps({"question": "   ", "answer": "5"}).encode(),
    json.dumps({"question": "x" * 5000, "answer": "1"}).encode(),
    b"[" * 100_000 + b"]" * 100_000,
]
# Line number (1-based) -> the reason the loader reports for it.
BAD_LINE_REASONS = {
    2: "invalid JSON",
    3: "missing field",
    4: "invalid UTF-8",
    5: "empty question",
    6: "question too long",
    7: "invalid JSON",
}


@dataclass(frozen=True)
class TinyRun:
    config: Path  # the run's config (its output_dir is replaced per run)
    data: Path
    ray_address: str


def problems_jsonl(path: Path) -> Path:
    """Good problems with every kind of bad line between them (see BAD_LINE_REASONS)."""
    good = [json.dumps({"question": q, "answer": a}).encode() for q, a in GOOD_QUESTIONS]
    lines = [good[0], *BAD_LINES, *good[1:]]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def write_inputs(model_dir: str, work: Path, ray_address: str) -> TinyRun:
    from omegaconf import OmegaConf

    from psr_ray.testing import tiny_cfg

    work.mkdir(parents=True, exist_ok=True)
    data = problems_jsonl(work / "problems.jsonl")
    cfg = tiny_cfg(
        model_dir,
        work / "unused",
        *DRIVER_OVERRIDES,
        f"data.source={data}",
        f"run.ray_address={ray_address}",
        "run.require_shared_storage=false",
    )  # one node: the test's tmp dir is its storage
    config = work / "tiny_run.yaml"
    config.write_text(OmegaConf.to_yaml(OmegaConf.create(json.loads(json.dumps(cfg.to_dict())))))
    return TinyRun(config, data, ray_address)


def _env(kill_dir: Path) -> dict[str, str]:
    job = {"runtime_env": {"env_vars": {kill_windows.ENV: str(kill_dir)}}}
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled",
            kill_windows.ENV: str(kill_dir), "RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps(job)}  # fmt: skip


def _argv(tiny: TinyRun, out: Path, resume: bool, overrides: tuple[str, ...]) -> list[str]:
    cli = [sys.executable, "-m", "psr_ray.app.cli", "run"]
    if resume:
        return [*cli, "--resume", str(out), *overrides]
    return [*cli, "--config", str(tiny.config), f"run.output_dir={out}", *overrides]


@dataclass
class Launch:
    """One `psr-ray run` (or `--resume`) process and what happened to it."""

    out: Path
    seconds: float
    returncode: int | None  # None: killed in its driver window
    log: str
    fired: dict[str, dict[str, Any]] = field(default_factory=dict)  # window -> ready info of the process killed
    pid: int = 0  # the driver's

    @property
    def error_lines(self) -> list[str]:
        """The CLI's own error lines (`psr-ray run: ...`); Ray's streamed worker output may come after them."""
        return [line for line in self.log.splitlines() if line.startswith("psr-ray run")]


def arm(kill_dir: Path, *specs: str) -> None:
    kill_dir.mkdir(parents=True, exist_ok=True)
    for ready in kill_dir.glob("ready.*.json"):
        ready.unlink()
    (kill_dir / kill_windows.ARMED).write_text("\n".join(specs) + "\n")


def launch(tiny: TinyRun, out: Path, kill_dir: Path, *, driver: str | None = None, worker: str | None = None,
           resume: bool = False, overrides: tuple[str, ...] = (), timeout_s: float = 900.0) -> Launch:  # fmt: skip
    """Runs `psr-ray run` (or `--resume`) with `overrides`; SIGKILLs the trainer worker that reaches `worker`
    and the driver when it reaches `driver` (window specs as in FRESH_RUN_WINDOWS)."""
    arm(kill_dir, *[spec for spec in (worker, driver) if spec])
    log_path = out.parent / f"{out.name}.{'resume' if resume else 'run'}.{time.monotonic_ns()}.log"
    windows = {spec.partition("@")[0]: role for spec, role in ((worker, "worker"), (driver, "driver")) if spec}
    fired: dict[str, dict[str, Any]] = {}
    start = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen(_argv(tiny, out, resume, overrides), cwd=REPO_ROOT, env=_env(kill_dir), stdout=log,
                                stderr=subprocess.STDOUT, text=True)  # fmt: skip
        try:
            while proc.poll() is None:
                for window, role in list(windows.items()):
                    ready = kill_windows.ready_file(kill_dir, window)
                    if not ready.is_file():
                        continue
                    fired[window] = json.loads(ready.read_text())
                    del windows[window]
                    os.kill(proc.pid if role == "driver" else fired[window]["pid"], signal.SIGKILL)
                    if role == "driver":
                        proc.wait()
                        return Launch(out, time.perf_counter() - start, None, log_path.read_text(), fired, proc.pid)
                if time.perf_counter() - start > timeout_s:
                    raise TimeoutError(
                        f"psr-ray run reached none of {sorted(windows)} in {timeout_s:.0f} s; see {log_path}"
                    )
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = log_path.read_text()
    if windows:
        raise RuntimeError(f"psr-ray run exited ({proc.returncode}) before reaching {sorted(windows)}:\n{text[-3000:]}")
    return Launch(out, time.perf_counter() - start, proc.returncode, text, fired, proc.pid)


def finish(tiny: TinyRun, out: Path, kill_dir: Path, *, resume: bool = False, worker: str | None = None) -> Launch:
    """Runs to the end (no driver window); raises with the log's tail if it fails."""
    done = launch(tiny, out, kill_dir, worker=worker, resume=resume)
    if done.returncode != 0:
        raise RuntimeError(
            f"psr-ray run {'--resume ' if resume else ''}{out} failed ({done.returncode}):\n{done.log[-3000:]}"
        )
    return done


# ---- comparing a run with the undisturbed one ------------------------------------------------------------


@dataclass
class Outcome:
    pairs: dict[str, dict[str, Any]]  # pair_id -> the whole row
    num_rows: int
    done_problems: set[str]
    committed: int  # the manifest's pair count
    trained: int  # pairs the trainer stepped on, from state.json's train record
    sync_versions: list[int]  # each engine's policy version after the sync
    eval_version: int | None  # the policy version iteration 1's answers were checked against
    final_version: int | None
    state: dict[str, Any]


def outcome(out: Path, iteration: int = 1) -> Outcome:
    from psr_ray.data.pairs_io import pairs_dir, read_manifest, read_pairs

    rows = read_pairs(str(out), iteration).to_pylist()
    manifest = read_manifest(pairs_dir(str(out), iteration))
    state = json.loads((out / "state.json").read_text())
    stages = state["iterations"].get(str(iteration), {})
    train, sync, evaluation = stages.get("train", {}), stages.get("sync", {}), stages.get("eval", {})
    return Outcome(
        pairs={row["pair_id"]: row for row in rows},
        num_rows=len(rows),
        done_problems=set(manifest["done_problems"]),
        committed=int(manifest["num_pairs"]),
        trained=int(train.get("num_pairs_trained", -1)),
        sync_versions=list(sync.get("engine_versions", [])),
        eval_version=evaluation.get("policy_version"),
        final_version=train.get("policy_version"),
        state=state,
    )


def compare_runs(base: Outcome, run: Outcome) -> dict[str, Any]:
    """Every figure of the fault table's row, computed against the undisturbed run."""
    final = base.final_version
    return {
        "problems_lost": len(base.done_problems - run.done_problems),
        "pairs_lost": len(set(base.pairs) - set(run.pairs)),
        "pairs_extra": len(set(run.pairs) - set(base.pairs)),
        "pairs_duplicated": run.num_rows - len(run.pairs),
        "pairs_changed": sum(1 for k, row in run.pairs.items() if k in base.pairs and base.pairs[k] != row),
        "trained_minus_committed": run.trained - run.committed,
        "engines_at_final_version": bool(run.sync_versions)
        and set(run.sync_versions) == {final}
        and run.eval_version == final,
    }


def recovered(diff: dict[str, Any], finished: bool) -> bool:
    """The fault table's "recovered": the run finished, and nothing was lost, added, duplicated or changed,
    every committed pair was trained once, every engine serves the final policy."""
    zero = (
        "problems_lost",
        "pairs_lost",
        "pairs_extra",
        "pairs_duplicated",
        "pairs_changed",
        "trained_minus_committed",
    )
    return finished and all(diff[key] == 0 for key in zero) and diff["engines_at_final_version"]
