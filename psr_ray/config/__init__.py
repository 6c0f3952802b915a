"""Typed run configuration: one frozen dataclass per component under one root (`sections.py`), built from YAML
and dotted overrides (`loading.load`); which weight-sync transport a layout gets (`topology`); `UserError`, what
every user mistake raises (`errors`). A leaf: the checks of paths, data and benchmarks before Ray starts are
`psr_ray.pipeline.preflight.validate`."""

from psr_ray.config.errors import UserError
from psr_ray.config.loading import from_dict, load, section_sources
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

__all__ = [
    "DEFAULT_CONFIG", "EMBEDDED_DATA", "EMBEDDED_MODEL", "REPO_ROOT", "DataConfig", "EnginePoolConfig",
    "EvalConfig", "InitConfig", "JudgeConfig", "JudgeMode", "JudgePlan", "LRSchedule", "ModelConfig", "PSRConfig",
    "RolloutConfig",
    "RunConfig", "SearchConfig", "TrainerConfig", "UserError", "WeightSyncBackend", "WeightSyncConfig", "from_dict",
    "load", "section_sources", "to_plain",
]  # fmt: skip
