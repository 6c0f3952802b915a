"""The trainer worker's memory budget (psr_ray.trainer.memory_budget): the activation count against autograd's
own saved tensors of HF Llama models, and the per-worker parts by hand."""

from __future__ import annotations

import pytest
import torch

from psr_ray.trainer.memory_budget import (
    ModelSizes,
    activation_values_per_token,
    budget_line,
    memory_metrics,
    worker_budget,
)


def saved_values_per_token(model: torch.nn.Module, tokens: torch.Tensor) -> float:
    """Values (4-byte units) autograd keeps for the backward of one forward, per token: distinct storages
    seen by the saved-tensor hooks, weights excluded."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=tokens, use_cache=False)
    return sum(n for ptr, n in seen.items() if ptr not in weights) / 4 / tokens.numel()


@pytest.mark.parametrize(("hidden", "inter", "heads", "kv_heads", "checkpointing"),
                         [(576, 1536, 9, 3, False), (128, 256, 2, 2, False), (256, 1024, 4, 1, True)])  # fmt: skip
def test_activation_count_matches_autograds_saved_tensors(hidden, inter, heads, kv_heads, checkpointing):
    # SmolLM2-135M's layer shape (with 2 layers and a small vocabulary, so it runs in a second) and others.
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=500, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=True)  # fmt: skip
    model = LlamaForCausalLM(config).train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    sizes = ModelSizes.of(config, [p.numel() for p in model.parameters()])
    expected = activation_values_per_token(sizes, gradient_checkpointing=checkpointing)
    if checkpointing:  # the forward keeps the layer inputs; one layer's recompute comes in the backward
        h = hidden
        expected -= 8 * h + 2 * sizes.kv_width + 4 * inter + heads + 2
    measured = saved_values_per_token(model, torch.randint(0, 500, (2, 32)))
    assert measured == pytest.approx(expected, rel=0.02)


def test_worker_budget_by_hand():
    sizes = ModelSizes(num_params=1000, largest_param=300, num_layers=2, hidden=4, intermediate=8, kv_width=2,
                       num_heads=2, vocab=10)  # fmt: skip
    per_token = 2 * (8 * 4 + 2 * 2 + 4 * 8 + 2 + 2) + 3 * 4  # 156
    assert activation_values_per_token(sizes, gradient_checkpointing=False) == per_token
    assert activation_values_per_token(sizes, gradient_checkpointing=True) == 2 * 4 + 12 + 72
    defaults = worker_budget(sizes, world_size=2, with_reference=True, max_tokens=6, max_logit_rows=3,
                             gradient_checkpointing=False, zero3_buffer_numel=0)  # fmt: skip
    assert defaults == {"params": 2000, "grads": 2000, "optimizer": 4000, "reference": 2000,
                        "gathered": 2 * 1000 * 4, "reduce_bucket": 1000 * 4, "activations": 156 * 6 * 4,
                        "logits": 2 * 3 * 10 * 4}  # fmt: skip
    bounded = worker_budget(sizes, world_size=3, with_reference=False, max_tokens=6, max_logit_rows=3,
                            gradient_checkpointing=True, zero3_buffer_numel=100)  # fmt: skip
    assert bounded["params"] == 334 * 4 and bounded["reference"] == 0
    assert bounded["gathered"] == (100 + 300) * 4 and bounded["reduce_bucket"] == 100 * 4
    assert bounded["activations"] == 92 * 6 * 4


def test_memory_metrics_and_their_results_line():
    gib = 2**30
    metrics = memory_metrics({"params": gib, "activations": gib // 2}, runtime_bytes=gib // 4,
                             measured=[(3 * gib, 2 * gib), (gib, gib // 2)])  # fmt: skip
    assert metrics == {"memory/params_gib": 1.0, "memory/activations_gib": 0.5, "memory/runtime_gib": 0.25,
                       "memory/accounted_gib": 1.75, "memory/worker0_peak_rss_gib": 3.0, "memory/worker0_pss_gib": 2.0,
                       "memory/worker1_peak_rss_gib": 1.0, "memory/worker1_pss_gib": 0.5}  # fmt: skip
    assert budget_line(metrics) == ("worker0 peak RSS 3.00 (PSS 2.00 at the end), worker1 peak RSS 1.00 (PSS 0.50 at "
                                    "the end); accounted per worker 1.75 = runtime 0.25 + params 1.00 + activations 0.50")  # fmt: skip
    assert budget_line({"train/loss": 0.5}) == ""


def test_policy_loaded_like_the_trainer_checkpoints_its_activations_with_dropout_off(tmp_path):
    # `from_pretrained` returns eval mode, where HF skips gradient checkpointing: the trainer's policy kept
    # every activation until `training_mode`. Loaded the trainer's way (`load_model`), from a saved model
    # with dropout configured.
    from transformers import LlamaConfig, LlamaForCausalLM

    from psr_ray.trainer.deepspeed_zero import load_model, training_mode

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=500, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, attention_dropout=0.5)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    ds = {"bf16": {"enabled": False}, "zero_optimization": {"stage": 0}}
    tokens = torch.randint(0, 500, (2, 32))
    loaded = load_model(str(tmp_path), ds, gradient_checkpointing=True)
    full = saved_values_per_token(loaded, tokens)  # as the trainer ran before: eval mode, nothing checkpointed
    policy = training_mode(load_model(str(tmp_path), ds, gradient_checkpointing=True))
    assert policy.training and all(m.training for m in policy.modules())
    assert saved_values_per_token(policy, tokens) < full / 4
    with torch.no_grad():  # dropout off: the same log-probabilities as in eval mode, call after call
        once, twice = (policy(input_ids=tokens).logits for _ in range(2))
        assert torch.equal(once, twice) and torch.allclose(once, loaded(input_ids=tokens).logits, atol=1e-6)
