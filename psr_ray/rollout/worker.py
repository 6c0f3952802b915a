"""Rollout workers: vLLM engines that propose candidate next steps (`EngineActor.propose`) and, between
iterations, receive the trainer's new weights in place (`update_weights`)."""

from __future__ import annotations

from typing import Any

from psr_ray.engine import create_engine_workers


def create_rollout_workers(
    cfg: Any, model_path: str, *, policy_version: int = 0, lifetime: str | None = None
) -> list[Any]:
    """Named actors `psr-rollout-<i>` sized by `cfg.rollout`, ready when this returns."""
    return create_engine_workers(cfg, model_path, role="rollout", policy_version=policy_version, lifetime=lifetime)
