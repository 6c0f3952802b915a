"""`trainer.cpu_bf16_autocast`: the trainer's model (loaded by `load_model`, checkpointed and in training
mode, as the worker builds it) runs its matmuls in bf16 while its parameters and gradients stay fp32, and
gives the log-probabilities and gradients of the fp32 model to within bf16's rounding."""

from __future__ import annotations

import torch

from psr_ray.trainer.loss import sequence_logps


def test_autocast_runs_bf16_matmuls_on_fp32_weights_close_to_fp32(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from psr_ray.trainer.deepspeed_zero import load_model, training_mode

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=500, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    ds = {"bf16": {"enabled": False}, "zero_optimization": {"stage": 0}}
    tokens = torch.randint(0, 500, (2, 32))
    mask = torch.ones_like(tokens)

    def run(autocast: bool) -> tuple[torch.Tensor, list[torch.Tensor], set[torch.dtype], torch.nn.Module]:
        model = training_mode(load_model(str(tmp_path), ds, gradient_checkpointing=True, cpu_bf16_autocast=autocast))
        seen: set[torch.dtype] = set()
        model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, out: seen.add(out.dtype))
        logps = sequence_logps(model(input_ids=tokens).logits, tokens, mask)
        logps.sum().backward()
        return logps.detach(), [p.grad for p in model.parameters()], seen, model

    exact, exact_grads, exact_seen, _ = run(False)
    mixed, grads, seen, model = run(True)
    assert exact_seen == {torch.float32} and seen == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(g is not None and g.dtype == torch.float32 for g in grads)
    # 31 token log-probabilities summed per row, each of a 500-way softmax: bf16 inputs moved their sums by 0.008 here.
    assert torch.allclose(mixed, exact, atol=0.05) and not torch.equal(mixed, exact)
    flat, exact_flat = torch.cat([g.flatten() for g in grads]), torch.cat([g.flatten() for g in exact_grads])
    assert torch.nn.functional.cosine_similarity(flat, exact_flat, dim=0) > 0.99
