"""Judge workers: vLLM engines that compare two candidate steps (`EngineActor.judge`, modes `explain` and
`direct`). The judge is the policy itself (self-rewarding), so it takes the same weight updates."""

from __future__ import annotations

from typing import Any

from psr_ray.engine import create_engine_workers


def create_judge_workers(
    cfg: Any, model_path: str, *, policy_version: int = 0, lifetime: str | None = None
) -> list[Any]:
    """Named actors `psr-judge-<i>` sized by `cfg.judge`, ready when this returns."""
    return create_engine_workers(cfg, model_path, role="judge", policy_version=policy_version, lifetime=lifetime)
