"""`psr-ray init`: build IFT/EFT data, fine-tune M0 into M1 on the trainer group, and compare both on held-out
data: judge accuracy on EFT pairs (both orders, modes direct and explain) and step-format compliance of
greedy solutions to IFT questions. Judge engines are started for M0, stopped for training, and started
again on M1's HF export."""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from psr_ray.config import JudgeMode, PSRConfig
from psr_ray.init_data.build import InitData, build_init_data, load_worked_problems, write_init_data

EVAL_JUDGE_MODES = (JudgeMode.DIRECT, JudgeMode.EXPLAIN)


@dataclass(frozen=True)
class ModelScores:
    model: str  # "M0" or "M1"
    judge: dict[str, Any]  # mode -> labelled.JudgeScores as a dict
    solving: dict[str, Any]  # eval.BenchmarkResult.row(): format_compliance, accuracy_boxed, steps_per_solution


@dataclass
class InitResult:
    data_files: dict[str, str]
    hf_dir: str  # M1, an HF folder
    num_sft_rows: int
    num_ift_train: int
    num_eft_train: int  # pairs; each gives 2 orders x 2 modes rows
    num_ift_test: int
    num_eft_test: int
    train_metrics: list[dict[str, float]] = field(default_factory=list)
    scores: list[ModelScores] = field(default_factory=list)
    table: str = ""


def initialize(
    cfg: PSRConfig, *, output_dir: str, num_ift: int | None = None, num_eft: int | None = None, evaluate: bool = True
) -> InitResult:
    """Writes `output_dir/{ift,eft}_{train,test}.parquet`, trains M1 under `output_dir/sft` (an existing
    checkpoint there is reused), evaluates M0 and M1 unless `evaluate=False`, prints the table and writes it to
    `output_dir/results.{md,json}`. `num_ift`/`num_eft` default to `cfg.init`'s sizes."""
    import pyarrow as pa
    import ray.data
    from transformers import AutoTokenizer

    from psr_ray.cluster import init_ray
    from psr_ray.models import resolve_model_path
    from psr_ray.trainer.group import train_sft

    out = Path(output_dir).expanduser().resolve()
    model_path = resolve_model_path(cfg.model.path, cfg.run.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    problems = load_worked_problems(
        cfg.data.source, split=cfg.data.split, seed=cfg.data.shuffle_seed, max_chars=cfg.data.max_problem_chars
    )
    data = build_init_data(
        problems,
        num_ift=num_ift or cfg.init.num_ift_examples,
        num_eft=num_eft or cfg.init.num_eft_examples,
        test_fraction=cfg.init.test_fraction,
        seed=cfg.run.seed,
    )
    files = write_init_data(tokenizer, data, out)
    train_rows = [
        {"prompt_text": r["prompt_text"], "target_text": r["target_text"]}
        for name in ("ift_train", "eft_train")
        for r in _read_rows(files[name])
    ]
    random.Random(cfg.run.seed).shuffle(train_rows)  # IFT and EFT interleaved in every batch
    print(
        f"[init] IFT {len(data.ift_train)} train / {len(data.ift_test)} held out, EFT {len(data.eft_train)} "
        f"pairs train / {len(data.eft_test)} held out; {len(train_rows)} SFT rows -> {out}",
        flush=True,
    )
    result = InitResult(
        data_files={k: str(v) for k, v in files.items()},
        hf_dir="",
        num_sft_rows=len(train_rows),
        num_ift_train=len(data.ift_train),
        num_eft_train=len(data.eft_train),
        num_ift_test=len(data.ift_test),
        num_eft_test=len(data.eft_test),
    )

    init_ray(cfg)
    if evaluate:
        result.scores.append(_score_with_engines(cfg, model_path, tokenizer, data, "M0"))
    trained = train_sft(
        cfg,
        model_path=model_path,
        dataset=ray.data.from_arrow(pa.Table.from_pylist(train_rows)),
        output_dir=str(out / "sft"),
        policy_version=1,
    )
    result.hf_dir, result.train_metrics = trained.hf_dir, trained.metrics
    print(f"[init] SFT: {trained.num_optimizer_steps} optimizer steps, M1 -> {trained.hf_dir}", flush=True)
    if evaluate:
        # Fresh engines load the export itself: M1 as any later stage will load it.
        result.scores.append(_score_with_engines(cfg, trained.hf_dir, tokenizer, data, "M1"))
    result.table = format_table(result)
    print(result.table, flush=True)
    (out / "results.md").write_text(result.table + "\n")
    (out / "results.json").write_text(json.dumps(asdict(result), indent=2, default=str) + "\n")
    return result


def _read_rows(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def _score_with_engines(cfg: PSRConfig, model_path: str, tokenizer: Any, data: InitData, name: str) -> ModelScores:
    """Scores `model_path` on judge engines started for it and stopped after, so that no engine holds
    memory while the trainer group runs."""
    import ray

    from psr_ray.engines.pool import start_engine_pool

    # A running PSR run's judges serve another model: they must be neither borrowed nor stopped.
    names = [f"psr-judge-{i}" for i in range(cfg.judge.num_engines)]
    busy = sorted(set(names) & set(ray.util.list_named_actors()))
    if busy:
        raise ValueError(f"judge engines {busy} are already running in this Ray namespace; stop that run first")
    engines = start_engine_pool(cfg, "judge", model_path, policy_version=0 if name == "M0" else 1).actors
    try:
        return _score_model(cfg, engines, tokenizer, data, name)
    finally:
        for engine in engines:
            ray.kill(engine)
        # The names are free only once the actors are gone; the next model's engines reuse them.
        deadline = time.monotonic() + 60
        while set(names) & set(ray.util.list_named_actors()) and time.monotonic() < deadline:
            time.sleep(0.2)


def _score_model(cfg: PSRConfig, engines: list[Any], tokenizer: Any, data: InitData, name: str) -> ModelScores:
    """Judge accuracy on held-out EFT pairs (both orders, every mode) and greedy solving of IFT questions."""
    import ray

    from psr_ray.eval import generate_all, score_solution, split_batches, summarize
    from psr_ray.init_data.labelled import judge_requests, score_judgments
    from psr_ray.prompts import render_solution_prompt

    requests, labels = judge_requests([item.pair for item in data.eft_test])
    judge = {}
    for mode in EVAL_JUDGE_MODES:
        batches = split_batches(len(requests), num_engines=len(engines), batch_size=256)
        refs = [
            engines[i % len(engines)].judge.remote(
                requests[start:end], mode=mode, temperature=0.0, max_tokens=cfg.judge.max_explanation_tokens
            )
            for i, (start, end) in enumerate(batches)
        ]
        judgments = [j for batch in ray.get(refs) for j in batch]
        judge[mode] = asdict(score_judgments(judgments, labels))
        print(f"[init] {name} judge {mode}: accuracy {judge[mode]['accuracy']:.3f}", flush=True)

    problems = data.ift_test
    prompts = [render_solution_prompt(tokenizer, p.question) for p in problems]
    generations = generate_all(engines, prompts, max_tokens=cfg.eval.max_tokens)
    scores = [score_solution(p, g.text, g.num_tokens) for p, g in zip(problems, generations, strict=True)]
    solving = summarize("held-out IFT", scores).row(iteration=0)
    print(f"[init] {name} step-format compliance {solving['format_compliance']:.3f}", flush=True)
    return ModelScores(name, judge, solving)


def format_table(result: InitResult) -> str:
    """Markdown: one row per model with judge and solving figures on held-out data."""
    header = (
        "| model | judge direct acc % | direct pair acc % | direct share A % | judge explain acc % | "
        "explain parse % | step-format % | boxed acc % | steps/solution |"
    )
    lines = [header, "|" + "---|" * 9]
    for s in result.scores:
        d, e, v = s.judge[JudgeMode.DIRECT], s.judge[JudgeMode.EXPLAIN], s.solving
        lines.append(
            f"| {s.model} | {100 * d['accuracy']:.1f} | {100 * d['pair_accuracy']:.1f} | {100 * d['share_a']:.1f} | "
            f"{100 * e['accuracy']:.1f} | {100 * e['parse_rate']:.1f} | {100 * v['format_compliance']:.1f} | "
            f"{100 * v['accuracy_boxed']:.1f} | {v['steps_per_solution']:.2f} |"
        )
    notes = (
        f"\nHeld out: {result.num_eft_test} EFT pairs ({2 * result.num_eft_test} judgments per mode, both orders), "
        f"{result.num_ift_test} IFT questions (greedy). Trained on {result.num_ift_train} IFT solutions + "
        f"{result.num_eft_train} EFT pairs = {result.num_sft_rows} SFT rows."
    )
    if result.train_metrics:
        first, last = result.train_metrics[0], result.train_metrics[-1]
        notes += f" SFT loss {first['train/loss']:.3f} (first step) -> {last['train/loss']:.3f} (last step)."
    return "\n".join(lines) + notes
