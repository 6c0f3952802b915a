"""What the run measures beside benchmark accuracy, every iteration: the judge accuracy of the served model
on the held-out oracle-labelled pairs (built by the init, both orders), and the pair precision of the
iteration's step pairs by the oracle beside a random pick among the same stored candidates.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from psr_ray.data.problems import Problem
from psr_ray.oracle.exact import has_exact_check
from psr_ray.oracle.judge import label_steps
from psr_ray.oracle.precision import PairPrecision, pair_precision, random_pick_precision


def pairs_precision(rows: Iterable[Mapping[str, Any]], problems: Mapping[str, Problem]) -> PairPrecision | None:
    """Pair precision of step-pair rows (STEP_PAIR_SCHEMA) whose problems have an exact step check; None when
    none has (a source without one would need Monte-Carlo rollouts: not run per iteration)."""
    outcomes = []
    for row in rows:
        problem = problems.get(row["problem_id"])
        if problem is None or not has_exact_check(problem):
            continue
        chosen, rejected, *labels = label_steps(problem, row["prefix"], [row["chosen"], row["rejected"],
                                                                          *row["candidates"]])  # fmt: skip
        outcomes.append((chosen, rejected, random_pick_precision(row["candidates"], labels)))
    return pair_precision(outcomes) if outcomes else None


def iteration_pair_precision(output_dir: str, iteration: int, problems: Iterable[Problem]) -> dict[str, Any] | None:
    """`pairs_precision` of the pairs committed for `iteration` under `output_dir`, as a dict."""
    from psr_ray.data.pairs_io import read_pairs

    table = read_pairs(output_dir, iteration)
    result = pairs_precision(table.to_pylist(), {p.problem_id: p for p in problems})
    return None if result is None else result.to_dict()


def judge_accuracy(engines: list[Any], pairs: list[Any], *, mode: str, max_tokens: int,
                   timeout_s: float | None = None) -> dict[str, Any] | None:  # fmt: skip
    """The served model's judge accuracy on held-out pairs (None without pairs), with 95% intervals."""
    from psr_ray.init_data.labelled import measure_judge

    if not pairs:
        return None
    return measure_judge(engines, pairs, mode=mode, max_tokens=max_tokens, timeout_s=timeout_s).to_dict() | {
        "mode": mode
    }
