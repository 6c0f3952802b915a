"""The one start-up of every command that runs engines (`psr-ray run`, `init`, `generate`, `eval`, `train`
and the bench scripts): the output folder's lock, the problems, the model, Ray, the engine pools and the
durable writes of commit points.

A command calls the steps in the order its checks must fail: the lock first (a second process on the
folder fails before anything else; `generate` loads its problems first, so a source with none makes no
folder), then the problems (bad data fails before a Ray cluster starts), then
Ray, then the engines. `start_pool` is the only place in psr_ray that starts engine pools (`start_engine`
adds one engine to a running pool: `psr-ray scale`, pipeline/elastic.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import time
from collections.abc import Iterator
from typing import Any

from psr_ray.config import PSRConfig, UserError
from psr_ray.engines.pool import EnginePool, engine_name, start_engine_pool
from psr_ray.pipeline.run_dir import RunDirLock, check_writable
from psr_ray.runtime.cluster import cluster_address


@dataclasses.dataclass
class RunSession:
    """What a command starts on: `cfg`, and the output folder it holds locked (None: it writes no run folder)."""

    cfg: PSRConfig
    folder: str | os.PathLike | None = None
    lock: RunDirLock | None = dataclasses.field(default=None, repr=False)

    @classmethod
    def locked(cls, cfg: PSRConfig, folder: str | os.PathLike, *, command: str = "run") -> RunSession:
        """A session holding `folder` locked (pipeline/run_dir.py) until `release()` or the process ends."""
        return cls(cfg, folder, RunDirLock(folder, command=command))

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()

    def check_writable(self, field: str = "run.output_dir") -> None:
        """The locked folder takes a write (a read-only or full disk fails here, naming `field`)."""
        assert self.folder is not None, "check_writable needs a session made by RunSession.locked"
        check_writable(self.folder, field)

    def load_problems(self, *, limit: int | None = None) -> list[Any]:
        """`data.source`'s problems (the first `limit`; None: all). Skipped lines are reported on the console;
        a source with no usable problem is a ValueError. Call it before `start_ray`: bad data fails fast."""
        from psr_ray.data.problems import load_problems

        data = self.cfg.data
        loaded = load_problems(data.source, split=data.split, limit=limit, seed=data.shuffle_seed,
                               max_chars=data.max_problem_chars)  # fmt: skip
        if loaded.skipped:
            print(f"[psr_ray] {data.source}: {loaded.summary()}")
            for line, reason in loaded.skipped[:10]:
                print(f"[psr_ray]   skipped line {line}: {reason}")
        if not loaded.problems:
            raise UserError(f"data.source {data.source!r} yielded no usable problems")
        return loaded.problems

    @functools.cached_property
    def model_path(self) -> str:
        """`model.path` as a local HF folder (the embedded model converted once) or an HF id."""
        from psr_ray.runtime.models import resolve_model_path

        return resolve_model_path(self.cfg.model.path, self.cfg.run.cache_dir)

    @functools.cached_property
    def tokenizer(self) -> Any:
        """The configured model's tokenizer (loaded on first use)."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.model_path, trust_remote_code=self.cfg.model.trust_remote_code)

    def start_ray(self, *, engines: bool = True, trainer: bool = True, counts: dict[str, int] | None = None) -> Any:
        """Joins `run.ray_address` or starts a local Ray sized for the run (runtime/cluster.py), then checks
        that the cluster can place what this command starts (its engines, its trainer workers) before any of
        it starts (pipeline/capacity.py; `counts`: engine counts `psr-ray scale` set for a resumed run), and
        that every node sees the run's folders (pipeline/node_paths.py); returns `ray`."""
        from psr_ray.pipeline.capacity import check_capacity
        from psr_ray.pipeline.node_paths import check_node_paths
        from psr_ray.runtime.cluster import init_ray

        ray = init_ray(self.cfg)
        warnings = check_capacity(self.cfg, engines=engines, trainer=trainer, counts=counts)
        for warning in warnings + check_node_paths(self.cfg, self.folder):
            print(f"[psr_ray] WARNING {warning}", flush=True)
        return ray

    def start_pool(self, role: str, model_path: str | None = None, *, policy_version: int = 0,
                   num_engines: int | None = None) -> EnginePool:  # fmt: skip
        """The `role` engine pool (engines/pool.py) on `model_path` (default: the configured model), started
        or found running; `num_engines` overrides `<role>.num_engines`."""
        cfg = self.cfg
        if num_engines is not None:  # a judge on the rollout engines (judge.num_engines: 0) counts theirs
            key = "rollout" if role == "judge" and cfg.judge.num_engines == 0 else role
            cfg = dataclasses.replace(cfg, **{key: dataclasses.replace(getattr(cfg, key), num_engines=num_engines)})
        return start_engine_pool(cfg, role, model_path or self.model_path, policy_version=policy_version)

    def start_engine(self, role: str, index: int, model_path: str, *, policy_version: int) -> Any:
        """One more `role` engine, `psr-<role>-<index>`, on `model_path`: its handle at once, not waited for
        (pipeline/elastic.py adds it to its pool once its `ready()` reports `policy_version`)."""
        from psr_ray.engines.pool import launch_engine

        return launch_engine(self.cfg, role, index, model_path, policy_version=policy_version)

    @contextlib.contextmanager
    def temporary_engines(self, role: str, model_path: str, policy_version: int) -> Iterator[list[Any]]:
        """Engines on `model_path` for one phase, killed after it (their names are then free again). No trainer
        runs meanwhile: as many as the run has engines of both roles, each on its own CPUs, or on a local
        cluster of CPU engines as many as this machine's cores hold (`phase_engine_count`)."""
        import ray

        count = phase_engine_count(self.cfg, os.cpu_count() or 1)
        names = [engine_name(role, i) for i in range(count)]
        busy = sorted(set(names) & set(ray.util.list_named_actors()))
        if busy:  # a running PSR run's engines serve another model: neither borrow nor stop them
            raise UserError(f"engines {busy} are already running in this Ray namespace; stop that run first")
        engines = self.start_pool(role, model_path, policy_version=policy_version, num_engines=count).actors
        try:
            yield engines
        finally:
            stop_engines(engines, names)

    @staticmethod
    def commit(path: str | os.PathLike, text: str) -> None:
        """Writes a commit point (a marker that says a phase is done): fsynced and renamed into place, so
        after a crash it is complete or absent (runtime/durable.py)."""
        from psr_ray.runtime.durable import write_atomic

        write_atomic(path, text)


def stop_engines(engines: list[Any], names: list[str]) -> None:
    """Kills `engines` and waits (up to 60 s) until their `names` are free for new engines."""
    import ray

    for engine in engines:
        ray.kill(engine)
    deadline = time.monotonic() + 60
    while set(names) & set(ray.util.list_named_actors()) and time.monotonic() < deadline:
        time.sleep(0.2)


def phase_engine_count(cfg: Any, cores: int) -> int:
    """Engines for a phase with no trainer (the init's candidates, held-out pairs and scores): the run's engines
    of both roles, or on a local cluster of CPU engines one per `rollout.num_cpus_per_engine` of this machine's
    `cores` if that is more, so no core idles (an engine's threads are the CPUs it reserves: two one-thread engines
    and one two-thread engine evaluate at the same speed, bench/results/engine_threads.md)."""
    count = cfg.rollout.num_engines + cfg.judge.num_engines
    if cluster_address(cfg) is not None or cfg.rollout.num_gpus_per_engine > 0:
        return count
    return max(count, int(cores // max(1.0, cfg.rollout.num_cpus_per_engine)))
