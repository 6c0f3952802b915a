"""Greedy evaluation on math benchmarks, the paper's protocol: the headline accuracy takes the last
`\\boxed{}` answer only (compared with Qwen2.5-Math-style equivalence, `verify.is_equivalent`), and the
lenient rule (boxed, else "the answer is", else the last number) stands beside it, never instead of it.
Each accuracy carries a 95% Wilson interval, and each row keeps its per-problem results so two models on the
same problems can be compared with an exact McNemar test (`report.py`). Also step statistics (the paper's
Table 4) and step-format compliance. Scoring is pure; `evaluate` sends prompts to engine actors
(psr_ray/engines/api.py `generate`), and `eval_command` is `psr-ray eval`: it starts the engines itself.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass
from typing import Any

from psr_ray.core.prompts import render_solution_prompt
from psr_ray.core.stats import wilson
from psr_ray.core.steps import extract_boxed, split_steps, step_header
from psr_ray.core.verify import extract_answer, is_equivalent
from psr_ray.data.problems import Problem, load_benchmark
from psr_ray.engines.api import split_batches


@dataclass(frozen=True)
class SolutionScore:
    problem_id: str
    question: str  # the problem and its gold answer, so solutions.jsonl can be audited on its own
    answer: str | None
    text: str  # the whole solution, forced `Step 1: ` header included
    predicted: str | None  # verify.extract_answer: boxed, else "the answer is", else the last number
    correct: bool
    correct_boxed: bool  # the paper's rule: only the last \boxed{} counts
    num_steps: int
    num_tokens: int
    formatted: bool  # at least one non-empty `Step n:` step and a non-empty \boxed{} answer


@dataclass(frozen=True)
class BenchmarkResult:
    benchmark: str
    n: int
    accuracy: float
    accuracy_boxed: float
    steps_per_solution: float
    tokens_per_step: float
    format_compliance: float
    num_tokens: int
    num_skipped: int  # benchmark rows without a usable question or answer
    scores: tuple[SolutionScore, ...]

    def row(self, iteration: int) -> dict[str, Any]:
        boxed = [s.correct_boxed for s in self.scores]
        lenient = [s.correct for s in self.scores]
        return {
            "iteration": iteration,
            "benchmark": self.benchmark,
            "n": self.n,
            "accuracy": self.accuracy,
            "accuracy_boxed": self.accuracy_boxed,
            "accuracy_boxed_ci95": list(wilson(sum(boxed), self.n)),
            "accuracy_ci95": list(wilson(sum(lenient), self.n)),
            "steps_per_solution": self.steps_per_solution,
            "tokens_per_step": self.tokens_per_step,
            "format_compliance": self.format_compliance,
            "num_tokens": self.num_tokens,
            "num_skipped": self.num_skipped,
            # Per-problem results in problem order ("1" right), for McNemar between models on these problems.
            "boxed_bits": "".join("1" if x else "0" for x in boxed),
            "lenient_bits": "".join("1" if x else "0" for x in lenient),
            "problems_digest": problems_digest([s.problem_id for s in self.scores]),
        }


def problems_digest(problem_ids: list[str]) -> str:
    """A short fingerprint of which problems, in which order, a row was computed on."""
    return hashlib.blake2b("\n".join(problem_ids).encode(), digest_size=6).hexdigest()


@dataclass(frozen=True)
class EvalResult:
    benchmarks: tuple[BenchmarkResult, ...]
    elapsed_s: float  # wall time of generation (all benchmarks at once), scoring excluded
    num_engines: int

    @property
    def num_problems(self) -> int:
        return sum(b.n for b in self.benchmarks)

    @property
    def num_tokens(self) -> int:
        return sum(b.num_tokens for b in self.benchmarks)

    @property
    def tokens_per_s(self) -> float:
        return self.num_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def problems_per_s(self) -> float:
        return self.num_problems / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def rows(self, iteration: int = 0) -> list[dict[str, Any]]:
        return [b.row(iteration) for b in self.benchmarks]


def score_solution(problem: Problem, generated: str, num_tokens: int) -> SolutionScore:
    """Scores one greedy generation; `generated` is what came after the prompt's forced `Step 1: `."""
    text = step_header(1) + generated
    steps = [s for s in split_steps(text) if s]
    boxed = extract_boxed(text)
    predicted = extract_answer(text)
    return SolutionScore(
        problem_id=problem.problem_id,
        question=problem.question,
        answer=problem.answer,
        text=text,
        predicted=predicted,
        correct=is_equivalent(predicted, problem.answer),
        correct_boxed=bool(boxed) and is_equivalent(boxed, problem.answer),
        num_steps=len(steps),
        num_tokens=num_tokens,
        formatted=bool(steps) and bool(boxed),
    )


def summarize(benchmark: str, scores: list[SolutionScore], *, num_skipped: int = 0) -> BenchmarkResult:
    """Per-benchmark figures. Tokens per step is total tokens over total steps (long solutions weigh more,
    as in a corpus statistic); an empty benchmark gives zeros."""
    n = len(scores)
    total_steps = sum(s.num_steps for s in scores)
    total_tokens = sum(s.num_tokens for s in scores)
    return BenchmarkResult(
        benchmark=benchmark,
        n=n,
        accuracy=_share(sum(s.correct for s in scores), n),
        accuracy_boxed=_share(sum(s.correct_boxed for s in scores), n),
        steps_per_solution=_share(total_steps, n),
        tokens_per_step=_share(total_tokens, total_steps),
        format_compliance=_share(sum(s.formatted for s in scores), n),
        num_tokens=total_tokens,
        num_skipped=num_skipped,
        scores=tuple(scores),
    )


def _share(part: float, whole: float) -> float:
    return part / whole if whole else 0.0


class StaleAnswerError(RuntimeError):
    """An engine answered at another policy version than the one being evaluated."""


def generate_all(
    engines: list[Any],
    prompts: list[str],
    *,
    max_tokens: int,
    batch_size: int = 256,
    policy_version: int | None = None,
    engine_names: list[str] | None = None,
    timeout_s: float | None = None,
) -> list[Any]:
    """Greedy generations for `prompts`, in order, spread over the engine actors (batch i -> engine i mod k).
    Each actor runs its calls one after another; vLLM batches the prompts of a call internally.

    With `policy_version`, every answer must carry it (`StaleAnswerError` otherwise: an engine restarted
    after the weight sync serves other weights and must not be scored as the new model). With `timeout_s`,
    an engine that does not answer in time is a TimeoutError naming it."""
    from psr_ray.runtime.waits import get_all

    if not engines:
        raise ValueError("evaluation needs at least one engine actor")
    names = engine_names or [repr(e) for e in engines]
    batches = split_batches(len(prompts), num_engines=len(engines), batch_size=batch_size)
    refs = [
        engines[i % len(engines)].generate.remote(prompts[start:end], max_tokens=max_tokens)
        for i, (start, end) in enumerate(batches)
    ]
    labels = [names[i % len(engines)] for i in range(len(refs))]
    results = get_all(refs, labels=labels, timeout_s=timeout_s if timeout_s is not None else 1e9, what="eval prompts")
    for label, batch in zip(labels, results, strict=True):
        versions = {generation.policy_version for generation in batch}
        if policy_version is not None and versions != {policy_version}:
            raise StaleAnswerError(
                f"{label} answered eval prompts at policy_version {sorted(versions)}, not {policy_version} "
                "(restarted after the weight sync?); its answers are not scored as that model"
            )
    return [generation for batch in results for generation in batch]


def evaluate(
    engines: list[Any],
    tokenizer: Any,
    benchmarks: list[str] | tuple[str, ...],
    *,
    limit: int | None,
    max_tokens: int,
    batch_size: int = 256,
    policy_version: int | None = None,
    engine_names: list[str] | None = None,
    timeout_s: float | None = None,
) -> EvalResult:
    """Greedy solutions to the first `limit` problems (None/0: all) of each benchmark, scored; every answer
    checked to come from `policy_version` when given (see `generate_all`)."""
    if not benchmarks:
        raise ValueError("name at least one benchmark, e.g. --benchmarks gsm8k,math500")
    loaded = {name: load_benchmark(name, limit=limit) for name in benchmarks}
    for name, result in loaded.items():
        if result.skipped:  # the console says what was dropped and why; an empty benchmark already raised
            print(f"[eval] {name}: {result.summary()}; first skipped: line {result.skipped[0][0]}: "
                  f"{result.skipped[0][1]}", flush=True)  # fmt: skip
    items = [(name, problem) for name in benchmarks for problem in loaded[name].problems]
    prompts = [render_solution_prompt(tokenizer, problem.question) for _, problem in items]
    start = time.perf_counter()
    generations = generate_all(
        engines,
        prompts,
        max_tokens=max_tokens,
        batch_size=batch_size,
        policy_version=policy_version,
        engine_names=engine_names,
        timeout_s=timeout_s,
    )
    elapsed = time.perf_counter() - start
    scores: dict[str, list[SolutionScore]] = {name: [] for name in benchmarks}
    for (name, problem), generation in zip(items, generations, strict=True):
        scores[name].append(score_solution(problem, generation.text, generation.num_tokens))
    results = tuple(summarize(name, scores[name], num_skipped=len(loaded[name].skipped)) for name in benchmarks)
    return EvalResult(results, elapsed, len(engines))


def throughput_line(result: EvalResult) -> str:
    return (
        f"{result.num_problems} problems, {result.num_tokens} generated tokens in {result.elapsed_s:.1f} s on "
        f"{result.num_engines} engine(s): {result.tokens_per_s:.1f} tokens/s, {result.problems_per_s:.2f} problems/s"
    )


def eval_command(
    cfg: Any, model: str, benchmarks: list[str] | tuple[str, ...], limit: int | None, *, output_dir: str | None = None
) -> EvalResult:
    """`psr-ray eval --model PATH_OR_ID --benchmarks gsm8k,math500 --limit N`: starts Ray here unless it is
    running (or `run.ray_address` names a cluster), creates `rollout.num_engines` engine actors, evaluates,
    prints the table and the throughput, and writes the report to `output_dir` when given."""
    import ray
    from transformers import AutoTokenizer

    from psr_ray.engines.pool import start_engine_pool
    from psr_ray.evaluation.tables import format_table, write_report, write_solutions
    from psr_ray.runtime.models import resolve_model_path

    model_path = resolve_model_path(model, cfg.run.cache_dir)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=model))
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    if not ray.is_initialized():
        ray.init(address=cfg.run.ray_address, include_dashboard=False)
    # Named engines already running (a driver's, a test session's) are reused and left running.
    running = set(ray.util.list_named_actors())
    engines = start_engine_pool(cfg, "rollout", model_path).actors
    try:
        result = evaluate(
            engines,
            tokenizer,
            benchmarks,
            limit=limit or None,
            max_tokens=cfg.eval.max_tokens,
            timeout_s=cfg.run.engine_call_timeout_s,
        )
    finally:
        infos = ray.get([e.ready.remote() for e in engines], timeout=cfg.run.engine_call_timeout_s)
        for engine, info in zip(engines, infos, strict=True):
            if info["name"] not in running:
                ray.kill(engine)
    print(format_table(result.rows()))
    print(throughput_line(result))
    if output_dir is not None:
        write_report(result.rows(), output_dir)
        write_solutions(result, output_dir)
    return result
