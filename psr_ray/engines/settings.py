"""What one vLLM engine is built with (`EngineSettings`), from the run's config, and the environment its process
needs before vLLM is imported. Pure: no vLLM or Ray import."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from psr_ray.config import EnginePoolConfig, WeightSyncBackend
from psr_ray.runtime.cluster import cpu_threads

ROLES = ("rollout", "judge")


@dataclass(frozen=True)
class EngineSettings:
    """Everything one engine needs; built from the config by `engine_settings`."""

    model_path: str  # a local HF folder or an HF id (already resolved from `embedded:`)
    role: str  # "rollout" or "judge"
    dtype: str = "float32"
    max_model_len: int = 2048
    tensor_parallel_size: int = 1
    use_gpu: bool = False
    gpu_memory_utilization: float = 0.45
    cpu_kv_cache_gib: float = 1.0
    cpu_kv_block_size: int = 32
    # CPU: torch threads of the in-process engine, the whole CPUs it reserved (as a trainer worker's).
    cpu_threads: int = 1
    enable_prefix_caching: bool = True
    trust_remote_code: bool = False
    seed: int = 0
    # vLLM's own stats (KV usage, queue, TTFT, tokens): exported as Ray metrics (engines/stat_logger.py) and
    # read by `engine_stats`.
    log_stats: bool = True
    # "nccl" builds the engine with vLLM's weight-transfer engine (weight_sync/nccl.py); None otherwise.
    weight_transfer_backend: str | None = None
    # Colocated engines sleep while the trainer trains (weight_sync.colocate; GPU only).
    sleep_mode: bool = False


def engine_settings(cfg: Any, role: str, model_path: str) -> EngineSettings:
    """Settings of a `role` engine from a `PSRConfig`; `model_path` is the resolved local folder."""
    from psr_ray.runtime.models import engine_dtype
    from psr_ray.weight_sync import backend_for

    if role not in ROLES:
        raise ValueError(f"engine role must be one of {ROLES}, got {role!r}")
    section: EnginePoolConfig = getattr(cfg, role)
    use_gpu = section.num_gpus_per_engine > 0
    return EngineSettings(
        model_path=model_path,
        role=role,
        dtype=engine_dtype(cfg.model.dtype, use_gpu),
        max_model_len=cfg.model.max_model_len,
        tensor_parallel_size=section.tensor_parallel_size,
        use_gpu=use_gpu,
        gpu_memory_utilization=section.gpu_memory_utilization,
        cpu_kv_cache_gib=section.cpu_kv_cache_gib,
        cpu_kv_block_size=section.cpu_kv_block_size,
        cpu_threads=cpu_threads(section.num_cpus_per_engine),
        enable_prefix_caching=section.enable_prefix_caching,
        trust_remote_code=cfg.model.trust_remote_code,
        seed=cfg.run.seed,
        weight_transfer_backend="nccl" if backend_for(cfg) is WeightSyncBackend.NCCL else None,
        sleep_mode=cfg.weight_sync.colocate,
    )


def engine_env(settings: EngineSettings) -> dict[str, str]:
    """Environment the engine needs before vLLM is imported (also given to the actor's runtime_env)."""
    env = {"TOKENIZERS_PARALLELISM": "false"}
    if settings.tensor_parallel_size == 1:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process engine: fast start, tensors pass intact
    if not settings.use_gpu:  # a local cluster starts every process at one thread (runtime/cluster.py)
        env["OMP_NUM_THREADS"] = str(settings.cpu_threads)
    return env
