"""Joining or starting the Ray cluster a command runs on."""

from __future__ import annotations

import math
import os
from typing import Any

from psr_ray.config import PSRConfig


def required_cpus(cfg: PSRConfig) -> int:
    """Logical CPUs the run's actors reserve at once: engines, trainer workers, and room for Ray Data tasks."""
    engines = sum(pool.num_engines * pool.num_cpus_per_engine for pool in (cfg.rollout, cfg.judge))
    trainer = cfg.trainer.num_workers * cfg.trainer.num_cpus_per_worker
    return math.ceil(engines + trainer) + 2


def init_ray(cfg: PSRConfig, **kwargs: Any) -> Any:
    """Connects to `run.ray_address` (or the cluster of a submitted job), or starts a local Ray sized for the
    run. Inside a submitted job Ray is already reachable and its runtime_env is left alone."""
    import ray

    from psr_ray import console

    if ray.is_initialized():
        return ray
    address = cfg.run.ray_address or os.environ.get("RAY_ADDRESS")
    kwargs = console.ray_init_kwargs(local=not address) | kwargs  # quiet console unless --verbose
    if address:
        ray.init(address=address, **kwargs)
        console.after_ray_init()
        return ray
    # A local cluster: logical CPUs may exceed cores (the embedded default oversubscribes 2 cores on purpose:
    # engines mostly wait on each other and the trainer), threads per process are kept at 1.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ray.init(
        num_cpus=max(os.cpu_count() or 1, required_cpus(cfg)),
        include_dashboard=kwargs.pop("include_dashboard", None),
        **kwargs,
    )
    console.after_ray_init()
    return ray
