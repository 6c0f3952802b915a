"""DeepSpeed ZeRO set-up for the trainer workers: config, policy and frozen reference, full-weight gather.

Runs inside Ray Train workers (a process group already exists). DeepSpeed is imported in functions only.
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Any

import torch

from psr_ray.config import TrainerConfig
from psr_ray.trainer.schedule import lr_multiplier

# The optimizer of every fit besides its learning rate (bench/trainer_cpu.py's plain loop uses the same).
ADAMW_PARAMS: dict[str, Any] = {"betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.0}
GRADIENT_CLIPPING = 1.0


def prepare_deepspeed(use_gpu: bool) -> None:
    """Environment and patches that must precede `import deepspeed` / `init_distributed`.

    On CPU `init_distributed` JIT-compiles the `deepspeed_shm_comm` op (g++ + ninja, 45-90 s on 2 cores; only
    DeepSpeed's inference all-reduce uses it), which made `deepspeed.initialize` take ~96 s for a 0.5M model.
    The module is imported via importlib because `import deepspeed.comm.torch as m` binds the real `torch`
    (the package re-exports the name), and patching that does nothing.
    """
    if not use_gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # type: ignore[attr-defined]
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")


def ds_config(
    tcfg: TrainerConfig,
    *,
    use_gpu: bool,
    world_size: int,
    learning_rate: float,
    with_optimizer: bool = True,
) -> dict[str, Any]:
    """The DeepSpeed config of one engine; `with_optimizer=False` for the frozen reference."""
    micro = tcfg.micro_batch_size
    if tcfg.global_batch_size % (micro * world_size):
        raise ValueError(
            f"trainer.global_batch_size ({tcfg.global_batch_size}) must be a multiple of micro_batch_size x "
            f"num_workers ({micro} x {world_size})"
        )
    config: dict[str, Any] = {
        "train_batch_size": tcfg.global_batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": tcfg.global_batch_size // (micro * world_size),
        "zero_optimization": {"stage": tcfg.zero_stage, "stage3_gather_16bit_weights_on_model_save": False},
        "bf16": {"enabled": use_gpu},
        "gradient_clipping": GRADIENT_CLIPPING,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if tcfg.zero3_buffer_numel and tcfg.zero_stage == 3:
        numel = tcfg.zero3_buffer_numel
        # No prefetch, as since ddfcb35 (a parameter left in flight then failed the final gather; the gather now
        # releases those itself, so prefetch could return here where measured worth its memory).
        config["zero_optimization"] |= {"reduce_bucket_size": numel, "stage3_prefetch_bucket_size": 0,
                                        "stage3_max_live_parameters": numel, "stage3_max_reuse_distance": numel}  # fmt: skip
    if with_optimizer:
        # torch's AdamW, not DeepSpeed's fused/CPU Adam: those are JIT-built C++/CUDA ops that need a compiler
        # toolchain (and minutes) on every fresh machine.
        config["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": learning_rate, **ADAMW_PARAMS, "torch_adam": True},
        }
    return config


def load_model(
    model_path: str, config: dict[str, Any], *, gradient_checkpointing: bool = False, cpu_bf16_autocast: bool = False
) -> torch.nn.Module:
    """The HF causal LM, built under `zero.Init` for stage 3 so each rank only ever holds its partition.
    `cpu_bf16_autocast` (fp32 CPU models only): every forward runs under CPU bf16 autocast; the backward
    follows the forward's dtypes, and checkpointed layers recompute under the autocast state they ran in."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    dtype = torch.bfloat16 if config["bf16"]["enabled"] else torch.float32
    # Must stay referenced while from_pretrained runs: transformers reads it through a weakref.
    hf_ds = HfDeepSpeedConfig(config) if config["zero_optimization"]["stage"] == 3 else None
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, attn_implementation="sdpa")
    del hf_ds
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cpu_bf16_autocast and dtype == torch.float32:
        # On the instance: DeepSpeed's hooks run around `forward` through `__call__` as before.
        model.forward = torch.autocast("cpu", dtype=torch.bfloat16)(model.forward)  # type: ignore[method-assign]
    return model


def build_policy(
    model_path: str,
    tcfg: TrainerConfig,
    *,
    use_gpu: bool,
    world_size: int,
    learning_rate: float,
) -> Any:
    """Trainable engine: AdamW at peak `learning_rate`, scheduled per optimizer step by `trainer.lr_schedule`
    (`schedule.lr_multiplier`: warm-up, then constant or a capped cosine)."""
    import deepspeed
    from torch.optim.lr_scheduler import LambdaLR

    config = ds_config(tcfg, use_gpu=use_gpu, world_size=world_size, learning_rate=learning_rate)
    model = load_model(model_path, config, gradient_checkpointing=tcfg.gradient_checkpointing,
                       cpu_bf16_autocast=tcfg.cpu_bf16_autocast)  # fmt: skip
    multiplier = functools.partial(
        lr_multiplier, schedule=tcfg.lr_schedule, warmup_steps=tcfg.warmup_steps, decay_steps=tcfg.lr_decay_steps,
        min_lr_ratio=tcfg.min_lr_ratio,
    )  # fmt: skip
    engine, *_ = deepspeed.initialize(
        model=training_mode(model),
        config=config,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        lr_scheduler=lambda opt: LambdaLR(opt, multiplier),
    )
    return engine


def training_mode(model: torch.nn.Module) -> torch.nn.Module:
    """Training mode with dropout off. `from_pretrained` returns a model in eval mode, and HF runs gradient
    checkpointing only in training mode: the policy kept every layer's activations (1.2 GiB more per worker
    and micro-step on the embedded run). Dropout stays off, as it was in eval mode: step-DPO compares the
    policy's and the reference's log-probabilities of the same tokens, and noise in one side biases the margin."""
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):  # HF attention: a rate, not a module
            module.attention_dropout = 0.0  # type: ignore[assignment]  # torch types it Tensor | Module
    return model


def build_reference(model_path: str, tcfg: TrainerConfig, *, use_gpu: bool, world_size: int) -> Any:
    """Frozen reference: a ZeRO engine without optimizer, so it is partitioned like the policy and costs
    1/world_size of the weights per rank, with no gradients or optimizer state."""
    import deepspeed

    config = ds_config(tcfg, use_gpu=use_gpu, world_size=world_size, learning_rate=0.0, with_optimizer=False)
    model = load_model(model_path, config, cpu_bf16_autocast=tcfg.cpu_bf16_autocast)
    model.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine


def gather_full_state_dict(
    engine: Any, *, bucket_numel: int = 256 * 2**20, every_rank: bool = False
) -> dict[str, torch.Tensor] | None:
    """Full weights as {HF name: CPU tensor} on rank 0 (`every_rank`: on every rank, a host copy each), None
    elsewhere. A collective: every rank must call it.

    Parameters are gathered in buckets of about `bucket_numel` elements so no rank ever holds the whole model
    on the device at once. Tied weights appear once (under the name `named_parameters` gives them).
    """
    import deepspeed
    import torch.distributed as dist

    # A forward without its backward (the held-out metrics) ends with the backward's first parameters still
    # being prefetched; GatheredParameters skips a parameter in flight, then cannot partition it. Wait for and
    # release every gathered one first (a no-op below ZeRO-3).
    engine.empty_partition_cache()
    rank = dist.get_rank() if dist.is_initialized() else 0
    params = list(engine.module.named_parameters())
    out: dict[str, torch.Tensor] = {}
    bucket: list[tuple[str, torch.nn.Parameter]] = []
    size = 0

    def flush() -> None:
        with deepspeed.zero.GatheredParameters([p for _, p in bucket], modifier_rank=None):
            if rank == 0 or every_rank:  # GatheredParameters gives every rank the whole parameter
                for name, p in bucket:
                    out[name] = p.detach().to("cpu", copy=True)

    for name, p in params:
        bucket.append((name, p))
        size += getattr(p, "ds_numel", p.numel())
        if size >= bucket_numel:
            flush()
            bucket, size = [], 0
    if bucket:
        flush()
    return out if rank == 0 or every_rank else None
