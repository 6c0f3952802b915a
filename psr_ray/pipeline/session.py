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
                   num_engines: int | None = None, num_cpus: float | None = None) -> EnginePool:  # fmt: skip
        """The `role` engine pool (engines/pool.py) on `model_path` (default: the configured model), started
        or found running; `num_engines` and `num_cpus` override `<role>.num_engines` and `.num_cpus_per_engine`."""
        cfg = self.cfg
        key = "rollout" if role == "judge" and cfg.judge.num_engines == 0 else role  # a judge on the rollout engines
        section = getattr(cfg, key)
        if num_engines is not None:
            section = dataclasses.replace(section, num_engines=num_engines)
        if num_cpus is not None:
            section = dataclasses.replace(section, num_cpus_per_engine=num_cpus)
        cfg = dataclasses.replace(cfg, **{key: section})
        return start_engine_pool(cfg, role, model_path or self.model_path, policy_version=policy_version)

    def start_engine(self, role: str, index: int, model_path: str, *, policy_version: int) -> Any:
        """One more `role` engine, `psr-<role>-<index>`, on `model_path`: its handle at once, not waited for
        (pipeline/elastic.py adds it to its pool once its `ready()` reports `policy_version`)."""
        from psr_ray.engines.pool import launch_engine

        return launch_engine(self.cfg, role, index, model_path, policy_version=policy_version)

    @contextlib.contextmanager
    def temporary_engines(self, role: str, model_path: str, policy_version: int) -> Iterator[list[Any]]:
        """Engines on `model_path` for one phase, killed after it (their names are then free again). As many as
        the run has engines of both roles: no trainer runs meanwhile, and each engine uses its own CPUs; on a
        local cluster of CPU engines they share all of this machine's cores (`temporary_engine_cpus`)."""
        import ray

        count = self.cfg.rollout.num_engines + self.cfg.judge.num_engines
        names = [engine_name(role, i) for i in range(count)]
        busy = sorted(set(names) & set(ray.util.list_named_actors()))
        if busy:  # a running PSR run's engines serve another model: neither borrow nor stop them
            raise UserError(f"engines {busy} are already running in this Ray namespace; stop that run first")
        engines = self.start_pool(role, model_path, policy_version=policy_version, num_engines=count,
                                  num_cpus=temporary_engine_cpus(self.cfg, count, os.cpu_count() or 1)).actors  # fmt: skip
        try:
            yield engines
        finally:
            for engine in engines:
                ray.kill(engine)
            deadline = time.monotonic() + 60
            while set(names) & set(ray.util.list_named_actors()) and time.monotonic() < deadline:
                time.sleep(0.2)

    @staticmethod
    def commit(path: str | os.PathLike, text: str) -> None:
        """Writes a commit point (a marker that says a phase is done): fsynced and renamed into place, so
        after a crash it is complete or absent (runtime/durable.py)."""
        from psr_ray.runtime.durable import write_atomic

        write_atomic(path, text)


def temporary_engine_cpus(cfg: Any, count: int, cores: int) -> float | None:
    """CPUs (and so threads) per engine for a phase whose `count` engines run with no trainer: this machine's
    `cores` split between them on a local cluster of CPU engines (a core would idle otherwise), never less
    than configured; None (as configured) on a remote cluster or GPU engines."""
    section = cfg.rollout
    if (cfg.run.ray_address or os.environ.get("RAY_ADDRESS") or "local") != "local" or section.num_gpus_per_engine > 0:
        return None
    return max(section.num_cpus_per_engine, float(max(1, cores // count)))
