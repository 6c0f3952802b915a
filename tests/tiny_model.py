"""A tiny Llama (2 layers, hidden 128, head_dim 64, byte-level BPE of ~1000 tokens) made offline for tests.

Random weights: it writes gibberish, but every code path (vLLM engines, DeepSpeed, weight sync) runs on it in
seconds. Built once per test session.
"""

from __future__ import annotations

import json
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _corpus() -> list[str]:
    from psr_ray.prompts import JUDGE_INSTRUCTION, SOLVER_INSTRUCTION

    here = Path(__file__).resolve().parent
    lines = [SOLVER_INSTRUCTION, JUDGE_INSTRUCTION, "Step 1: Step 2: Step 3: \\boxed{42} [[A]] [[B]] Verdict:"]
    gsm8k = here.parent.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
    if gsm8k.is_file():
        with gsm8k.open() as f:
            for i, line in enumerate(f):
                if i >= 2000:
                    break
                row = json.loads(line)
                lines += [row["question"], row["answer"]]
    return lines + [str(n) for n in range(1000)]


def build_tiny_model(out_dir: str, *, vocab_size: int = 1024, seed: int = 0) -> str:
    """Writes the model, tokenizer and chat template to `out_dir` (idempotent) and returns it."""
    out = Path(out_dir)
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return str(out)
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    tokenizer.chat_template = CHAT_TEMPLATE

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


if __name__ == "__main__":
    import sys

    print(build_tiny_model(sys.argv[1] if len(sys.argv) > 1 else "/tmp/psr_tiny_model"))
