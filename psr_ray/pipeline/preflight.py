"""`validate()`: every user mistake in a `PSRConfig`, reported at once, before anything starts."""

from __future__ import annotations

import psr_ray.data.checks as checks
from psr_ray.config.errors import UserError
from psr_ray.config.sections import PSRConfig
from psr_ray.config.storage import storage_errors
from psr_ray.config.topology import backend_for, colocation_problems


def has_gpu() -> bool:
    """True when this process can see a CUDA device; torch is imported only here, and only if installed."""
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def validate(cfg: PSRConfig, *, gpu_available: bool | None = None, check_paths: bool = True) -> PSRConfig:
    """Rejects every user mistake with a UserError naming the field and the fix. Returns `cfg`."""
    errors: list[str] = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            errors.append(message)

    for section in ("rollout", "judge"):
        sub = getattr(cfg, section)
        if section == "judge":
            need(
                sub.num_engines >= 0,
                f"judge.num_engines must be >= 0 (0: the judge runs on the rollout engines), got {sub.num_engines}",
            )
        else:
            need(sub.num_engines >= 1, f"rollout.num_engines must be >= 1, got {sub.num_engines}")
        need(sub.num_cpus_per_engine >= 0, f"{section}.num_cpus_per_engine must be >= 0")
        need(sub.num_gpus_per_engine >= 0, f"{section}.num_gpus_per_engine must be >= 0")
        need(sub.tensor_parallel_size >= 1, f"{section}.tensor_parallel_size must be >= 1")
        need(
            sub.tensor_parallel_size == 1 or sub.num_gpus_per_engine >= sub.tensor_parallel_size,
            f"{section}.tensor_parallel_size={sub.tensor_parallel_size} needs "
            f"{section}.num_gpus_per_engine >= {sub.tensor_parallel_size}",
        )
        need(0 < sub.gpu_memory_utilization <= 1, f"{section}.gpu_memory_utilization must be in (0, 1]")
        need(sub.cpu_kv_cache_gib > 0, f"{section}.cpu_kv_cache_gib must be > 0")
        need(
            sub.cpu_kv_block_size > 0 and sub.cpu_kv_block_size % 32 == 0,
            f"{section}.cpu_kv_block_size must be a positive multiple of 32 (vLLM's CPU kernels), "
            f"got {sub.cpu_kv_block_size}",
        )
        need(sub.max_restarts >= 0, f"{section}.max_restarts must be >= 0")

    context = cfg.model.max_model_len
    r = cfg.rollout
    need(r.num_candidates >= 2, f"rollout.num_candidates must be >= 2 to form a pair, got {r.num_candidates}")
    need(r.temperature >= 0, "rollout.temperature must be >= 0")
    need(0 < r.top_p <= 1, f"rollout.top_p must be in (0, 1], got {r.top_p}")
    need(r.max_step_tokens >= 1, "rollout.max_step_tokens must be >= 1")
    # An engine skips a prompt that leaves no room for this many new tokens: every step would come back empty.
    need(
        r.max_step_tokens < context,
        f"rollout.max_step_tokens ({r.max_step_tokens}) must be below "
        f"model.max_model_len ({context}), leaving room for the prompt",
    )

    j = cfg.judge
    need(j.temperature >= 0, "judge.temperature must be >= 0")
    need(
        j.mode != "oracle" or cfg.data.source.startswith("embedded:arith"),
        f"judge.mode=oracle (an ablation: the exact step check judges) needs a source with an exact step check, "
        f"data.source=embedded:arith, not {cfg.data.source!r}",
    )
    need(j.max_explanation_tokens >= 1, "judge.max_explanation_tokens must be >= 1")
    need(
        j.max_explanation_tokens < context,
        f"judge.max_explanation_tokens ({j.max_explanation_tokens}) must "
        f"be below model.max_model_len ({context}), leaving room for the prompt",
    )

    s = cfg.search
    need(s.max_steps >= 1, f"search.max_steps must be >= 1, got {s.max_steps}")
    need(s.max_rollbacks >= 0, "search.max_rollbacks must be >= 0")
    need(s.max_problems_in_flight >= 1, "search.max_problems_in_flight must be >= 1")
    need(s.flush_pairs >= 1, f"search.flush_pairs must be >= 1, got {s.flush_pairs}")
    need(
        s.min_score_margin > 0,
        f"search.min_score_margin must be > 0 (0 would train tied pairs), got {s.min_score_margin}",
    )

    t = cfg.trainer
    need(t.num_workers >= 1, f"trainer.num_workers must be >= 1, got {t.num_workers}")
    need(t.zero_stage in (0, 1, 2, 3), f"trainer.zero_stage must be 0-3, got {t.zero_stage}")
    need(t.beta > 0, f"trainer.beta must be > 0, got {t.beta}")
    need(t.learning_rate > 0, f"trainer.learning_rate must be > 0, got {t.learning_rate}")
    need(t.sft_learning_rate > 0, f"trainer.sft_learning_rate must be > 0, got {t.sft_learning_rate}")
    need(t.micro_batch_size >= 1, f"trainer.micro_batch_size must be >= 1, got {t.micro_batch_size}")
    if t.micro_batch_size >= 1 and t.num_workers >= 1:
        need(
            t.global_batch_size >= 1 and t.global_batch_size % (t.micro_batch_size * t.num_workers) == 0,
            f"trainer.global_batch_size ({t.global_batch_size}) must be a positive multiple of "
            f"micro_batch_size x num_workers ({t.micro_batch_size} x {t.num_workers})",
        )
    need(t.sft_micro_batch_size >= 0, f"trainer.sft_micro_batch_size must be >= 0, got {t.sft_micro_batch_size}")
    if t.sft_micro_batch_size >= 1 and t.num_workers >= 1 and t.global_batch_size >= 1:
        sft_micro = t.for_sft().micro_batch_size
        need(
            t.global_batch_size % (sft_micro * t.num_workers) == 0,
            f"trainer.sft_micro_batch_size ({sft_micro} a worker) x num_workers ({t.num_workers}) must divide "
            f"trainer.global_batch_size ({t.global_batch_size})",
        )
    need(t.sft_zero_stage in (None, 0, 1, 2, 3), f"trainer.sft_zero_stage must be 0-3, got {t.sft_zero_stage}")
    need(t.num_epochs >= 1 and t.sft_num_epochs >= 1, "trainer epochs must be >= 1")
    need(t.warmup_steps >= 0, f"trainer.warmup_steps must be >= 0, got {t.warmup_steps}")
    need(
        t.lr_schedule != "cosine" or t.lr_decay_steps >= 1,
        "trainer.lr_schedule=cosine needs trainer.lr_decay_steps >= 1 (optimizer steps from the peak to its end)",
    )
    need(t.lr_decay_steps >= 0, f"trainer.lr_decay_steps must be >= 0, got {t.lr_decay_steps}")
    need(0 <= t.min_lr_ratio <= 1, f"trainer.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")
    need(
        t.shuffle_buffer_size >= 0,
        f"trainer.shuffle_buffer_size must be >= 0 (0: no shuffle), got {t.shuffle_buffer_size}",
    )
    need(t.max_seq_len >= 16, "trainer.max_seq_len must be >= 16")
    need(
        t.zero3_buffer_numel >= 0,
        f"trainer.zero3_buffer_numel must be >= 0 (0: DeepSpeed's defaults), got {t.zero3_buffer_numel}",
    )
    need(
        0 <= t.heldout_accuracy_ci < 0.5,
        f"trainer.heldout_accuracy_ci must be in [0, 0.5) (0: every held-out pair), got {t.heldout_accuracy_ci}",
    )
    need(t.start_timeout_s > 0, f"trainer.start_timeout_s must be > 0, got {t.start_timeout_s}")
    need(
        t.max_failures >= 0,
        f"trainer.max_failures must be >= 0 (0: a worker death fails the fit), got {t.max_failures}",
    )

    need(cfg.weight_sync.bucket_mb >= 1, "weight_sync.bucket_mb must be >= 1")
    need(cfg.weight_sync.timeout_s > 0, f"weight_sync.timeout_s must be > 0, got {cfg.weight_sync.timeout_s}")

    try:
        backend_for(cfg)
    except ValueError as err:  # a transport this layout cannot run (the message names the fields)
        errors.append(str(err))
    errors.extend(colocation_problems(cfg))

    need(
        cfg.model.dtype in ("auto", "float32", "bfloat16", "float16"),
        "model.dtype must be auto, float32, bfloat16 or float16",
    )
    need(cfg.model.max_model_len >= 64, "model.max_model_len must be >= 64")
    need(cfg.data.max_problem_chars >= 1, "data.max_problem_chars must be >= 1")
    need(
        len(cfg.eval.benchmarks) >= 1 or not cfg.eval.every_iteration,
        "eval.benchmarks must name at least one benchmark",
    )
    need(cfg.eval.limit >= 0, "eval.limit must be >= 0 (0 means all)")
    need(cfg.eval.max_tokens >= 1, "eval.max_tokens must be >= 1")
    need(
        cfg.eval.max_tokens <= context,
        f"eval.max_tokens ({cfg.eval.max_tokens}) must be at most model.max_model_len ({context})",
    )
    errors.extend(checks.benchmark_errors(cfg.eval.benchmarks))
    errors.extend(checks.split_errors(cfg.data.source, cfg.data.split))

    i = cfg.init
    need(i.num_ift_examples >= 1, f"init.num_ift_examples must be >= 1, got {i.num_ift_examples}")
    need(i.num_eft_pairs >= 0, f"init.num_eft_pairs must be >= 0 (0: no EFT), got {i.num_eft_pairs}")
    need(i.max_eft_problems >= 0, f"init.max_eft_problems must be >= 0 (0: all), got {i.max_eft_problems}")
    need(i.num_candidates >= 2, f"init.num_candidates must be >= 2 to form a pair, got {i.num_candidates}")
    need(i.temperature > 0, f"init.temperature must be > 0 (candidates must differ), got {i.temperature}")
    need(i.num_rollouts >= 1, f"init.num_rollouts must be >= 1, got {i.num_rollouts}")
    need(i.num_heldout_problems >= 1 and i.num_heldout_pairs >= 1,
         "init.num_heldout_problems and init.num_heldout_pairs must be >= 1")  # fmt: skip

    run = cfg.run
    need(run.num_iterations >= 1, f"run.num_iterations must be >= 1, got {run.num_iterations}")
    need(
        len(run.prompts_per_iteration) >= 1 and all(n >= 1 for n in run.prompts_per_iteration),
        "run.prompts_per_iteration must be a non-empty list of positive counts, e.g. [400, 800, 1200]",
    )
    need(
        run.wandb_mode in ("auto", "online", "offline", "disabled"),
        "run.wandb_mode must be auto, online, offline or disabled",
    )
    need(bool(run.output_dir), "run.output_dir must not be empty")
    need(run.engine_start_timeout_s > 0, f"run.engine_start_timeout_s must be > 0, got {run.engine_start_timeout_s}")
    need(run.engine_call_timeout_s > 0, f"run.engine_call_timeout_s must be > 0, got {run.engine_call_timeout_s}")
    need(run.engine_unavailable_timeout_s > 0,
         f"run.engine_unavailable_timeout_s must be > 0, got {run.engine_unavailable_timeout_s}")  # fmt: skip
    need(
        0 <= run.malloc_mmap_threshold_mib <= 32,
        f"run.malloc_mmap_threshold_mib must be in [0, 32] (0: glibc's own), got {run.malloc_mmap_threshold_mib}",
    )
    if run.ray_address is not None:
        errors.extend(checks.ray_address_errors(run.ray_address))

    wants_gpu = [
        f"{name}"
        for name, value in (
            ("rollout.num_gpus_per_engine", r.num_gpus_per_engine),
            ("judge.num_gpus_per_engine", j.num_gpus_per_engine),
            ("trainer.use_gpu", float(t.use_gpu)),
        )
        if value > 0
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
        # Packages a source needs are checked only for a local run: a cluster's image may have them.
        local = run.ray_address is None
        errors.extend(checks.model_errors(cfg.model.path, context, check_packages=local))
        errors.extend(checks.data_errors(cfg.data.source, check_packages=local))
        errors.extend(checks.output_dir_errors(run.output_dir))
        if local:
            errors.extend(checks.benchmark_package_errors(cfg.eval.benchmarks))

    errors += storage_errors(cfg, check_paths=check_paths)  # multi-node runs: shared output_dir, node groups
    if errors:
        # One line, so the CLI prints exactly one line whatever went wrong.
        raise UserError("invalid config: " + "; ".join(errors))
    return cfg
