"""Typed run configuration: one frozen dataclass per component under one root (`sections.py`), built from YAML
and dotted overrides (`loading.load`) and checked before Ray starts (`validation.validate`), which rejects
every mistake a user can make with a `ValueError` that names the field and the fix."""

from psr_ray.config.loading import from_dict, load
from psr_ray.config.sections import (
    DEFAULT_CONFIG,
    EMBEDDED_DATA,
    EMBEDDED_MODEL,
    REPO_ROOT,
    DataConfig,
    EnginePoolConfig,
    EvalConfig,
    InitConfig,
    JudgeConfig,
    JudgeMode,
    JudgePlan,
    LRSchedule,
    ModelConfig,
    PSRConfig,
    RolloutConfig,
    RunConfig,
    SearchConfig,
    TrainerConfig,
    WeightSyncBackend,
    WeightSyncConfig,
    to_plain,
)
from psr_ray.config.validation import has_gpu, validate

__all__ = [
    "DEFAULT_CONFIG", "EMBEDDED_DATA", "EMBEDDED_MODEL", "REPO_ROOT", "DataConfig", "EnginePoolConfig",
    "EvalConfig", "InitConfig", "JudgeConfig", "JudgeMode", "JudgePlan", "LRSchedule", "ModelConfig", "PSRConfig",
    "RolloutConfig",
    "RunConfig", "SearchConfig", "TrainerConfig", "WeightSyncBackend", "WeightSyncConfig", "from_dict",
    "has_gpu", "load", "to_plain", "validate",
]  # fmt: skip
