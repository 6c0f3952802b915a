"""Which transport a topology can run: where the trainer's rank 0 and every engine worker sit. Pure."""

from __future__ import annotations

from typing import Any

from psr_ray.config.errors import UserError
from psr_ray.config.sections import WeightSyncBackend


def resolve_backend(
    backend: WeightSyncBackend | str,
    *,
    trainer_gpu: bool,
    engines_gpu: bool,
    engines_own_gpus: bool,
    colocate: bool,
) -> WeightSyncBackend:
    """The transport for a topology. NCCL refuses two ranks on one GPU, so it needs trainer rank 0 and
    every engine worker on a GPU of its own (`engines_own_gpus`: whole GPUs per worker, not colocated);
    engines sharing the trainer's GPU (`colocate`) use CUDA IPC; anything else, the object store.
    `auto` picks that way; an explicit choice the topology cannot run is a ValueError naming the field."""
    backend = WeightSyncBackend(backend)
    on_gpus = trainer_gpu and engines_gpu
    if colocate and not on_gpus:
        raise UserError("weight_sync.colocate needs a GPU trainer (trainer.use_gpu) and GPU engines "
                        "(rollout/judge.num_gpus_per_engine > 0)")  # fmt: skip
    nccl_ok = on_gpus and engines_own_gpus and not colocate
    if backend is WeightSyncBackend.AUTO:
        if colocate:
            return WeightSyncBackend.CUDA_IPC
        return WeightSyncBackend.NCCL if nccl_ok else WeightSyncBackend.OBJECT_STORE
    if backend is WeightSyncBackend.NCCL and not nccl_ok:
        raise UserError(
            "weight_sync.backend=nccl needs a GPU trainer and engines with whole GPUs of their own "
            "(NCCL refuses two ranks on one GPU); use cuda_ipc with weight_sync.colocate, or object_store"
        )
    if backend is WeightSyncBackend.CUDA_IPC and not colocate:
        raise UserError("weight_sync.backend=cuda_ipc needs the engines on the trainer's GPU: set "
                        "weight_sync.colocate=true, or use nccl / object_store")  # fmt: skip
    return backend


def backend_for(cfg: Any) -> WeightSyncBackend:
    """The transport a `PSRConfig` resolves to."""
    pools = (cfg.rollout, cfg.judge)
    return resolve_backend(
        cfg.weight_sync.backend,
        trainer_gpu=cfg.trainer.use_gpu,
        engines_gpu=all(p.num_gpus_per_engine > 0 for p in pools),
        # Engines with tensor parallelism get one whole-GPU bundle per worker (engines/pool.py).
        engines_own_gpus=all(p.tensor_parallel_size > 1 or p.num_gpus_per_engine >= 1 for p in pools),
        colocate=cfg.weight_sync.colocate,
    )


# Colocation reserves each GPU as two fractional shares: the engines' and the trainer worker's. Ray places a
# fractional bundle on one GPU; capping the trainer's share keeps the engines' share above half a GPU, so no
# two engine shares fit on one GPU and each trainer worker lands on the share its GPU's engines left.
MAX_TRAINER_GPU_SHARE = 0.4


def colocated_shares(cfg: Any) -> tuple[float, float]:
    """(the engines' share of each GPU, one trainer worker's share) under `weight_sync.colocate`: engine i
    of each role and trainer rank i share GPU i; the trainer takes what the engines leave, at most
    MAX_TRAINER_GPU_SHARE (Ray's shares are logical: the trainer trains while the engines sleep)."""
    problems = colocation_problems(cfg)
    if problems:
        raise ValueError("; ".join(problems))
    engines = _engine_gpus_per_gpu(cfg)
    trainer = round(min(1.0 - engines, MAX_TRAINER_GPU_SHARE), 4)  # Ray counts shares in 1e-4 units
    return round(1.0 - trainer, 4), trainer


def colocation_problems(cfg: Any) -> list[str]:
    """Why `cfg` cannot be colocated (empty when it can, or when `weight_sync.colocate` is off)."""
    if not cfg.weight_sync.colocate:
        return []
    n, problems = cfg.trainer.num_workers, []
    if cfg.rollout.num_engines != n or cfg.judge.num_engines not in (0, n):
        problems.append(f"weight_sync.colocate puts engine i of each role on trainer rank i's GPU: it needs "
                        f"rollout.num_engines == trainer.num_workers ({n}) and judge.num_engines 0 or {n}, got "
                        f"{cfg.rollout.num_engines} and {cfg.judge.num_engines}")  # fmt: skip
    for role, section in _colocated_pools(cfg):
        if section.tensor_parallel_size != 1 or not 0 < section.num_gpus_per_engine < 1:
            problems.append(f"weight_sync.colocate needs {role} engines on a fraction of one GPU "
                            f"(0 < {role}.num_gpus_per_engine < 1, tensor_parallel_size 1), got "
                            f"{section.num_gpus_per_engine:g} GPUs, tensor_parallel_size {section.tensor_parallel_size}")  # fmt: skip
    if not problems and _engine_gpus_per_gpu(cfg) > 1.0 - 1e-4:
        problems.append(f"weight_sync.colocate: the engines on each GPU ask for {_engine_gpus_per_gpu(cfg):g} of it, "
                        "leaving no share for the trainer worker; lower rollout/judge.num_gpus_per_engine")  # fmt: skip
    return problems


def _colocated_pools(cfg: Any) -> list[tuple[str, Any]]:
    return [("rollout", cfg.rollout)] + ([("judge", cfg.judge)] if cfg.judge.num_engines > 0 else [])


def _engine_gpus_per_gpu(cfg: Any) -> float:
    return float(sum(section.num_gpus_per_engine for _, section in _colocated_pools(cfg)))
