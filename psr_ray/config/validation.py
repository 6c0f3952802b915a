"""`validate()`: every user mistake in a `PSRConfig`, reported at once, before anything starts."""

from __future__ import annotations

import os
from pathlib import Path

from psr_ray.config.sections import EMBEDDED_MODEL, PSRConfig


def has_gpu() -> bool:
    """True when this process can see a CUDA device; torch is imported only here, and only if installed."""
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def validate(cfg: PSRConfig, *, gpu_available: bool | None = None, check_paths: bool = True) -> PSRConfig:
    """Rejects every user mistake with a ValueError naming the field and the fix. Returns `cfg`."""
    errors: list[str] = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            errors.append(message)

    for section in ("rollout", "judge"):
        sub = getattr(cfg, section)
        need(sub.num_engines >= 1, f"{section}.num_engines must be >= 1, got {sub.num_engines}")
        need(sub.num_cpus_per_engine >= 0, f"{section}.num_cpus_per_engine must be >= 0")
        need(sub.num_gpus_per_engine >= 0, f"{section}.num_gpus_per_engine must be >= 0")
        need(sub.tensor_parallel_size >= 1, f"{section}.tensor_parallel_size must be >= 1")
        need(
            sub.tensor_parallel_size == 1 or sub.num_gpus_per_engine >= sub.tensor_parallel_size,
            f"{section}.tensor_parallel_size={sub.tensor_parallel_size} needs "
            f"{section}.num_gpus_per_engine >= {sub.tensor_parallel_size}",
        )
        need(0 < sub.gpu_memory_utilization <= 1, f"{section}.gpu_memory_utilization must be in (0, 1]")
        need(sub.cpu_kv_cache_gib >= 1, f"{section}.cpu_kv_cache_gib must be >= 1")
        need(sub.max_restarts >= 0, f"{section}.max_restarts must be >= 0")

    r = cfg.rollout
    need(r.num_candidates >= 2, f"rollout.num_candidates must be >= 2 to form a pair, got {r.num_candidates}")
    need(r.temperature >= 0, "rollout.temperature must be >= 0")
    need(0 < r.top_p <= 1, f"rollout.top_p must be in (0, 1], got {r.top_p}")
    need(r.max_step_tokens >= 1, "rollout.max_step_tokens must be >= 1")

    j = cfg.judge
    need(j.temperature >= 0, "judge.temperature must be >= 0")
    need(j.max_explanation_tokens >= 1, "judge.max_explanation_tokens must be >= 1")

    s = cfg.search
    need(s.max_steps >= 1, f"search.max_steps must be >= 1, got {s.max_steps}")
    need(s.max_rollbacks >= 0, "search.max_rollbacks must be >= 0")
    need(s.max_problems_in_flight >= 1, "search.max_problems_in_flight must be >= 1")

    t = cfg.trainer
    need(t.num_workers >= 1, f"trainer.num_workers must be >= 1, got {t.num_workers}")
    need(t.zero_stage in (0, 1, 2, 3), f"trainer.zero_stage must be 0-3, got {t.zero_stage}")
    need(t.beta > 0, f"trainer.beta must be > 0, got {t.beta}")
    need(t.learning_rate > 0 and t.sft_learning_rate > 0, "trainer learning rates must be > 0")
    need(t.micro_batch_size >= 1, "trainer.micro_batch_size must be >= 1")
    need(
        t.global_batch_size >= 1 and t.global_batch_size % (t.micro_batch_size * t.num_workers) == 0,
        f"trainer.global_batch_size ({t.global_batch_size}) must be a positive multiple of "
        f"micro_batch_size x num_workers ({t.micro_batch_size} x {t.num_workers})",
    )
    need(t.num_epochs >= 1 and t.sft_num_epochs >= 1, "trainer epochs must be >= 1")
    need(0 <= t.warmup_ratio < 1, "trainer.warmup_ratio must be in [0, 1)")
    need(t.max_seq_len >= 16, "trainer.max_seq_len must be >= 16")
    need(t.max_failures >= 0, f"trainer.max_failures must be >= 0 (0: a worker death fails the fit), got {t.max_failures}")

    need(cfg.weight_sync.bucket_mb >= 1, "weight_sync.bucket_mb must be >= 1")
    need(cfg.weight_sync.timeout_s > 0, f"weight_sync.timeout_s must be > 0, got {cfg.weight_sync.timeout_s}")
    from psr_ray.weight_sync.topology import backend_for

    try:
        backend_for(cfg)
    except ValueError as err:  # a transport this layout cannot run (the message names the fields)
        errors.append(str(err))

    need(cfg.model.dtype in ("auto", "float32", "bfloat16", "float16"), "model.dtype must be auto, float32, bfloat16 or float16")
    need(cfg.model.max_model_len >= 64, "model.max_model_len must be >= 64")
    need(cfg.data.max_problem_chars >= 1, "data.max_problem_chars must be >= 1")
    need(len(cfg.eval.benchmarks) >= 1 or not cfg.eval.every_iteration, "eval.benchmarks must name at least one benchmark")
    need(cfg.eval.limit >= 0, "eval.limit must be >= 0 (0 means all)")
    need(cfg.eval.max_tokens >= 1, "eval.max_tokens must be >= 1")

    i = cfg.init
    need(i.num_ift_examples >= 1, f"init.num_ift_examples must be >= 1, got {i.num_ift_examples}")
    need(i.num_eft_examples >= 1, f"init.num_eft_examples must be >= 1, got {i.num_eft_examples}")
    need(0 < i.test_fraction < 1, f"init.test_fraction must be in (0, 1), e.g. 0.1, got {i.test_fraction}")

    run = cfg.run
    need(run.num_iterations >= 1, f"run.num_iterations must be >= 1, got {run.num_iterations}")
    need(
        len(run.prompts_per_iteration) >= 1 and all(n >= 1 for n in run.prompts_per_iteration),
        "run.prompts_per_iteration must be a non-empty list of positive counts, e.g. [400, 800, 1200]",
    )
    need(run.wandb_mode in ("auto", "online", "offline", "disabled"), "run.wandb_mode must be auto, online, offline or disabled")
    need(bool(run.output_dir), "run.output_dir must not be empty")

    wants_gpu = [
        f"{name}" for name, value in (
            ("rollout.num_gpus_per_engine", r.num_gpus_per_engine),
            ("judge.num_gpus_per_engine", j.num_gpus_per_engine),
            ("trainer.use_gpu", float(t.use_gpu)),
        ) if value > 0
    ]
    # A remote cluster may have GPUs the submitting machine lacks, so only a local run is checked.
    if wants_gpu and run.ray_address is None:
        if gpu_available is None:
            gpu_available = has_gpu()
        need(
            gpu_available,
            f"{', '.join(wants_gpu)} ask(s) for GPUs but none is visible here; set them to 0/false "
            "(e.g. use psr_ray/configs/embedded_cpu.yaml) or pass run.ray_address for a GPU cluster",
        )

    if check_paths:
        need(_model_exists(cfg.model.path), f"model.path {cfg.model.path!r} is neither an existing folder, "
             "an HF model id (org/name), nor embedded:smollm2-135m-instruct")
        need(_data_exists(cfg.data.source), f"data.source {cfg.data.source!r} is neither an existing .jsonl file, "
             "hf:<dataset id>, embedded:gsm8k nor embedded:math")

    if errors:
        raise ValueError("invalid config:\n  - " + "\n  - ".join(errors))
    return cfg


def _model_exists(path: str) -> bool:
    if path.startswith("embedded:"):
        return path == EMBEDDED_MODEL
    local = Path(os.path.expanduser(path))
    if local.exists():
        return local.is_dir()
    # `org/name` is an HF id; anything that looks like a filesystem path must exist.
    return path.count("/") == 1 and not path.startswith((".", "/", "~"))


def _data_exists(source: str) -> bool:
    if source.startswith("embedded:"):
        return source in ("embedded:gsm8k", "embedded:math")
    if source.startswith("hf:"):
        return len(source) > 3
    return Path(os.path.expanduser(source)).is_file()
