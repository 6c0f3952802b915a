"""The Monte-Carlo step oracle (Math-Shepherd, arXiv 2312.08935): a step's value is the share of `k` sampled
completions from the problem + previous steps + the step that reach the reference answer; the step is labelled
right when at least one does (Math-Shepherd's hard estimate). Completions run on the rollout engines
(`EngineActor.sample`); a step that already states a final answer is valued by that answer alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from psr_ray.core.prompts import render_solver_prompt
from psr_ray.core.steps import extract_boxed, is_final_step, join_steps
from psr_ray.core.verify import is_equivalent
from psr_ray.data.problems import Problem


@dataclass(frozen=True)
class StepToValue:
    problem: Problem
    previous: tuple[str, ...]  # the steps before it
    step: str


def completion_prompt(tokenizer: Any, item: StepToValue) -> str:
    """The solver prompt that continues after `item.step` with the next step's header."""
    steps = [*item.previous, item.step]
    return render_solver_prompt(tokenizer, item.problem.question, join_steps(steps), len(steps) + 1)


def answer_reached(item: StepToValue, completion: str) -> bool:
    """Whether the solution `previous + step + completion` ends in the reference answer (last `\\boxed{}`)."""
    return is_equivalent(extract_boxed(completion), item.problem.answer)


def rollout_values(
    engines: Sequence[Any],
    tokenizer: Any,
    items: Sequence[StepToValue],
    *,
    num_rollouts: int,
    temperature: float = 0.7,
    max_tokens: int = 256,
    seed: int = 0,
    batch_size: int = 64,
) -> list[float]:
    """The Monte-Carlo value of every item (0..1), spreading batches over the engines."""
    import ray

    values: list[float | None] = [None] * len(items)
    todo = []
    for i, item in enumerate(items):
        if is_final_step(item.step):  # nothing to roll out: the step's own answer decides
            values[i] = float(is_equivalent(extract_boxed(item.step), item.problem.answer))
        else:
            todo.append(i)
    from psr_ray.engines.api import split_batches

    prompts = [completion_prompt(tokenizer, items[i]) for i in todo]
    bounds = split_batches(len(todo), num_engines=len(engines), batch_size=batch_size)
    batches = [todo[s:e] for s, e in bounds]
    refs = [
        engines[b % len(engines)].sample.remote(prompts[s:e], num_samples=num_rollouts, temperature=temperature,
                                                 max_tokens=max_tokens, seed=seed + s * num_rollouts)
        for b, (s, e) in enumerate(bounds)
    ]  # fmt: skip
    for batch, result in zip(batches, ray.get(refs), strict=True):
        for i, generations in zip(batch, result, strict=True):
            values[i] = sum(answer_reached(items[i], g.text) for g in generations) / num_rollouts
    return [float(v) for v in values]  # type: ignore[arg-type]


def hard_label(value: float) -> bool:
    """Math-Shepherd's hard estimate: right when any rollout reached the answer."""
    return value > 0
