"""Every sync is checked: each engine's log-probs on a fixed probe prompt against the trainer's model.

After the new weights are in but before they are committed, every engine answers `ProbeSpec.token_ids`
with vLLM's own forward (`EngineActor.probe`: the log-prob of every prompt token given the ones before it,
and the top `num_top` next tokens, once through the prefix cache, where blocks the previous sync's probe left
would show if the cache were not reset, and once afresh). The trainer's rank 0 computes the same with HF transformers from the
very tensors it just sent (`reference_logprobs`: an empty-weight model skeleton given the state dict's
tensors, no copy). A max |difference| above the dtype's tolerance fails the sync, naming the engine.

Tolerances: float32 1e-3. Honest engines measured 3e-5 from the reference on this probe (SmolLM2), and up
to 1.2e-4 with every SmolLM2 weight moved by 0.02*randn (sharper logits; vLLM's oneDNN kernels sum in another
order than torch), so 1e-4 would fail honest syncs; the failures this guards against measured 2.3 and more.
bf16 / fp16 are looser because both sides round activations to 8 (bf16) or 11 (fp16) mantissa bits in
different kernels and orders: honest engines differ by O(0.01-0.1) nats. The failures this guards against
are orders of magnitude larger: a stale output head (2.3 nats on SmolLM2, the top tokens differ), layers
left on meta or half loaded (NaN or 1e14), another policy's weights (12 nats for the perturbation above).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

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
TOLERANCE = {"float32": 1e-3, "bfloat16": 0.25, "float16": 0.05}


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


def tolerance_for(dtype: str) -> float:
    return TOLERANCE.get(dtype, TOLERANCE["bfloat16"])


def probe_error(reference: dict[str, Any], answer: dict[str, Any]) -> float:
    """Max |log-prob difference| over the prompt tokens and the engine's top next tokens (asked twice:
    through the prefix cache and afresh); NaN and inf count as infinitely far, as do answers of another
    length."""
    ref_prompt, got_prompt = reference["prompt"], answer["prompt"]
    tops = [answer["top"], answer.get("cached_top", answer["top"])]
    if len(ref_prompt) != len(got_prompt) or not all(tops):
        return math.inf
    diffs = [abs(a - b) for a, b in zip(ref_prompt, got_prompt, strict=True)]
    ref_next = reference["next"]
    diffs += [abs(ref_next[int(token)] - lp) for top in tops for token, lp in top.items()]
    if not all(math.isfinite(d) for d in diffs):  # NaN compares false with everything: test it first
        return math.inf
    return max(diffs)


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
