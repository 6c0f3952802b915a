"""What one ZeRO-3 trainer worker's memory holds, computed from the model's sizes, to set beside its measured
RSS/PSS (the trainer's `memory/*` metrics).

Per worker, for N parameters on W workers at b bytes a value (fp32 on CPU: 4):
  params        N/W x b      the worker's partition of the policy
  grads         N/W x b      its gradient partition (ZeRO-3 keeps only the worker's share)
  optimizer     2N/W x b     AdamW's two moments; in fp32 the partition is its own master copy
  reference     N/W x b      the frozen reference's partition (DPO only)
  gathered      the parameters gathered whole for the module running now: with DeepSpeed's default reuse
                distance (1e9 elements) every parameter reused within it stays gathered through the step, i.e.
                the whole model (policy and reference); with `trainer.zero3_buffer_numel` about that many
                elements plus the largest module's
  reduce_bucket the gradient bucket: min(N, 5e8 or zero3_buffer_numel) elements
  activations   saved for the backward, per token of the largest micro-batch (rows x padded length):
                each decoder layer keeps 8h + 2kv + 4i + heads + 2 values (h hidden, kv the key/value width, i
                the MLP width: counted from autograd's saved tensors of HF's Llama, tests/trainer), the model
                3h more; with gradient checkpointing a layer keeps only its input (h), and one layer is
                recomputed at a time in the backward
  logits        the head's output at the scored positions and its gradient: 2 x scored positions x vocab
The worker's runtime (Python, torch, DeepSpeed, Ray: measured before the model is built) comes on top.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

DEEPSPEED_REDUCE_BUCKET = 500_000_000  # DeepSpeed's reduce_bucket_size default (elements)


@dataclass(frozen=True)
class ModelSizes:
    num_params: int
    largest_param: int  # elements of the largest parameter (SmolLM2: the tied embedding)
    num_layers: int
    hidden: int
    intermediate: int
    kv_width: int  # key/value heads x head dim
    num_heads: int
    vocab: int

    @classmethod
    def of(cls, config: Any, param_numels: list[int]) -> ModelSizes:
        """From a HF decoder config (Llama, Qwen2, ...) and the numel of every parameter (tied ones once)."""
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return cls(num_params=sum(param_numels), largest_param=max(param_numels), num_layers=config.num_hidden_layers,
                   hidden=config.hidden_size, intermediate=config.intermediate_size, kv_width=kv_heads * head_dim,
                   num_heads=config.num_attention_heads, vocab=config.vocab_size)  # fmt: skip


def activation_values_per_token(sizes: ModelSizes, *, gradient_checkpointing: bool) -> int:
    """Values autograd keeps per token of a forward for its backward (module doc)."""
    h = sizes.hidden
    per_layer = 8 * h + 2 * sizes.kv_width + 4 * sizes.intermediate + sizes.num_heads + 2
    if gradient_checkpointing:
        return sizes.num_layers * h + 3 * h + per_layer
    return sizes.num_layers * per_layer + 3 * h


# The order in which reports list a worker's parts: the runtime measured first, then worker_budget's keys.
PARTS = ("runtime", "params", "grads", "optimizer", "reference", "gathered", "reduce_bucket", "activations", "logits")


def worker_budget(
    sizes: ModelSizes,
    *,
    world_size: int,
    with_reference: bool,
    max_tokens: int,
    max_logit_rows: int,
    gradient_checkpointing: bool,
    zero3_buffer_numel: int,
    bytes_per_value: int = 4,
) -> dict[str, int]:
    """Bytes per component of one worker's memory (module doc); `max_tokens` is the largest micro-batch's
    rows x padded length, `max_logit_rows` its scored positions (each row's own)."""
    b, n = bytes_per_value, sizes.num_params
    part = math.ceil(n / world_size) * b
    gathered = n if not zero3_buffer_numel else min(n, zero3_buffer_numel + sizes.largest_param)
    bucket = min(n, zero3_buffer_numel or DEEPSPEED_REDUCE_BUCKET)
    per_token = activation_values_per_token(sizes, gradient_checkpointing=gradient_checkpointing)
    return {
        "params": part,
        "grads": part,
        "optimizer": 2 * part,
        "reference": part if with_reference else 0,
        "gathered": gathered * b * (2 if with_reference else 1),
        "reduce_bucket": bucket * b,
        "activations": per_token * max_tokens * b,
        "logits": 2 * max_logit_rows * sizes.vocab * b,
    }


def memory_metrics(budget: dict[str, int], *, runtime_bytes: int, measured: list[tuple[int, int]]) -> dict[str, float]:
    """The trainer's `memory/*` metrics (GiB): each budget component, the runtime measured before the model
    was built, their sum (`accounted`), and per worker (rank order) its peak RSS and its PSS at the end."""
    gib = 2**30
    out = {f"memory/{name}_gib": value / gib for name, value in budget.items()}
    out["memory/runtime_gib"] = runtime_bytes / gib
    out["memory/accounted_gib"] = (runtime_bytes + sum(budget.values())) / gib
    for rank, (peak_rss, pss) in enumerate(measured):
        out[f"memory/worker{rank}_peak_rss_gib"] = peak_rss / gib
        out[f"memory/worker{rank}_pss_gib"] = pss / gib
    return out


def budget_line(metrics: dict[str, float]) -> str:
    """One line for the results: measured per worker against the accounted parts; "" without the metrics."""
    if "memory/accounted_gib" not in metrics:
        return ""
    parts = " + ".join(
        f"{name} {metrics[f'memory/{name}_gib']:.2f}" for name in PARTS if f"memory/{name}_gib" in metrics
    )
    workers = sorted(k for k in metrics if k.endswith("_peak_rss_gib"))
    measured = ", ".join(f"{k.removeprefix('memory/').removesuffix('_peak_rss_gib')} peak RSS {metrics[k]:.2f} "
                         f"(PSS {metrics[k.replace('_peak_rss_', '_pss_')]:.2f} at the end)" for k in workers)  # fmt: skip
    return f"{measured}; accounted per worker {metrics['memory/accounted_gib']:.2f} = {parts}"
