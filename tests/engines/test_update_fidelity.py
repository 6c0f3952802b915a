"""After an in-place update, an engine serves exactly the model it was given, on every update path: in-memory
tensors, an HF export folder, and the object-store sync end to end. Checked against HF transformers (fp32)
loaded from the same weights: next-token log-probs on fixed prompts within 1e-4, a prompt longer than one
KV-cache block among them (asked before every update too, so stale cached blocks would show).

SmolLM2-135M ties its output head to its embedding; before the fix, every path left its engine computing
"new embedding, old head" (log-probs off by nats). The tiny model (untied) runs the same checks in seconds.
One engine at a time: SmolLM2 is ~0.5 GB in fp32."""

from __future__ import annotations

import pytest
import torch

from psr_ray.weight_sync.object_store import ObjectStoreSender
from psr_ray.weight_sync.probe import make_probe

pytestmark = pytest.mark.ray

PROMPTS = [
    "The capital of France is",
    "Question: what is 12 * 7? Answer:",
    # Longer than one CPU KV-cache block (128 tokens).
    "Step 1: " + " ".join(f"{i} + {i + 1} = {2 * i + 1}." for i in range(40)) + " Step 2:",
]


def hf_top5(model_dir: str, tokenizer) -> list[dict[int, float]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tops = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)])
            logprobs = torch.log_softmax(model(ids).logits[0, -1].float(), dim=-1)
            values, indices = logprobs.topk(5)
            tops.append(dict(zip(indices.tolist(), values.tolist(), strict=True)))
    return tops


def engine_error(ray, engine, tokenizer, expected: list[dict[int, float]]) -> float:
    """Max |log-prob difference| from `expected` at its top-5 tokens (the engine's top-5 must be the same)."""
    worst = 0.0
    for prompt, want in zip(PROMPTS, expected, strict=True):
        ids = tokenizer.encode(prompt, add_special_tokens=False)
        got = ray.get(engine.probe.remote(ids, 5))["cached_top"]
        if set(got) != set(want):
            return float("inf")
        worst = max(worst, max(abs(got[t] - want[t]) for t in want))
    return worst


def perturbed_copy(model_dir: str, out: str, seed: int) -> str:
    """`model_dir`'s model with every weight moved by 0.02 * randn, saved like a trainer's HF export."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    noise = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # a tied head is the embedding's Parameter: moved once
            p.add_(0.02 * torch.randn(p.shape, generator=noise))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module", params=["tiny", pytest.param("smollm2", marks=pytest.mark.slow)])
def engine(request, ray_cluster, tiny_model_dir, tmp_path_factory):
    from transformers import AutoTokenizer

    from psr_ray import config as C
    from psr_ray.engines.actor import EngineActor
    from psr_ray.engines.settings import engine_settings

    model_dir = tiny_model_dir if request.param == "tiny" else request.getfixturevalue("embedded_model_dir")
    cfg = C.load([], [f"model.path={model_dir}", "model.max_model_len=512"])
    actor = (
        ray_cluster.remote(EngineActor)
        .options(num_cpus=0)
        .remote(engine_settings(cfg, "rollout", model_dir), name=f"fidelity-{request.param}", policy_version=1)
    )
    ray_cluster.get(actor.ready.remote())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    folders = [perturbed_copy(model_dir, str(tmp_path_factory.mktemp(f"{request.param}_{s}")), s) for s in (1, 2, 3)]
    yield actor, tokenizer, model_dir, folders
    ray_cluster.kill(actor)


def test_every_update_path_serves_exactly_the_given_model(ray_cluster, engine):
    from psr_ray.runtime.models import load_safetensors_dir

    actor, tokenizer, model_dir, (a, b, c) = engine
    base = hf_top5(model_dir, tokenizer)
    assert engine_error(ray_cluster, actor, tokenizer, base) < 1e-4  # fresh engine; caches the long prompt

    ray_cluster.get(actor.update_weights.remote(load_safetensors_dir(a), policy_version=2))
    expected = hf_top5(a, tokenizer)
    assert engine_error(ray_cluster, actor, tokenizer, expected) < 1e-4, "in-memory tensors"

    ray_cluster.get(actor.update_weights_from_path.remote(b, policy_version=3))
    expected = hf_top5(b, tokenizer)
    assert engine_error(ray_cluster, actor, tokenizer, expected) < 1e-4, "HF export folder"

    sender = ObjectStoreSender([actor], probe=make_probe(tokenizer, model_dir), restore_dir=b, timeout_s=300)
    report = sender.send(load_safetensors_dir(c), policy_version=4)
    assert report.ok, report.error
    expected = hf_top5(c, tokenizer)
    assert engine_error(ray_cluster, actor, tokenizer, expected) < 1e-4, "object-store sync"
    assert ray_cluster.get(actor.policy_version.remote()) == 4
