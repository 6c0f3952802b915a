"""IFT and EFT data for the initialization SFT (M0 -> M1), as Parquet. Pure apart from file I/O.

- IFT: a worked solution in the step format (`segment.py`), prompt = the solution prompt ending in the forced
  `Step 1:`, target = the rest of the solution (from the space before step 1's first word) and EOS.
- EFT: the reference step of a verified solution against the same step with one number changed
  (`labelled.build_corrupted_pairs`), in both orders (right step as A, then as B: exactly half the
  verdicts are A), with a templated explanation (`explain.py`). Each order is written for both judge modes:
  `explain` (prompt ends in `Explanation:`, target ` <explanation>\\nVerdict: [[A]]`) and `direct` (prompt
  ends in `Verdict: [[`, target `A]]`), so both modes read the verdict letter after the same `Verdict: [[`.
Problems are split before anything is built: no problem of the held-out split is in a training file.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from psr_ray.config import JudgeMode
from psr_ray.data.problems import Problem, read_source
from psr_ray.init_data.explain import explain
from psr_ray.init_data.labelled import LabelledPair, build_corrupted_pairs, judge_requests
from psr_ray.init_data.segment import worked_solution
from psr_ray.prompts import DIRECT_VERDICT_PREFIX, render_judge_prompt, render_solution_prompt
from psr_ray.steps import join_steps, step_header

JUDGE_MODES = (JudgeMode.EXPLAIN, JudgeMode.DIRECT)


@dataclass(frozen=True)
class EFTPair:
    problem_id: str
    pair: LabelledPair  # question, prefix, good_step, bad_step


@dataclass(frozen=True)
class InitData:
    ift_train: list[Problem]
    ift_test: list[Problem]
    eft_train: list[EFTPair]
    eft_test: list[EFTPair]


def load_worked_problems(
    source: str, *, split: str = "train", seed: int = 0, max_chars: int | None = None
) -> list[Problem]:
    """Every row of `source` (as `data.problems.load_problems` names sources) with a worked solution,
    shuffled by `seed`. Ids are `<name>-<split>-<row index>`, the ids `load_problems` gives."""
    found = read_source(source, split)
    worked = []
    for index, _, row in found.rows:
        solution = worked_solution(row)
        if solution is None or (max_chars is not None and len(solution[0]) > max_chars):
            continue
        question, steps, answer = solution
        worked.append(Problem(f"{found.name}-{found.split}-{index}", question, answer, found.name, tuple(steps)))
    random.Random(seed).shuffle(worked)
    return worked


def eft_pair(problem: Problem, seed: int) -> EFTPair | None:
    """One labelled pair from `problem`'s steps (a random step holding an integer, and its corruption);
    None when no step holds one. Steps are flattened to one line each, the form `build_corrupted_pairs` reads."""
    answer = "\n".join(" ".join(step.split()) for step in problem.steps)
    pairs = build_corrupted_pairs([{"question": problem.question, "answer": answer}], 1, seed)
    return EFTPair(problem.problem_id, pairs[0]) if pairs else None


def build_init_data(
    problems: list[Problem], *, num_ift: int, num_eft: int, test_fraction: float, seed: int = 0
) -> InitData:
    """Held-out problems first (`test_fraction` of all used, at least one), then training problems;
    IFT and EFT each take the first problems of their split (EFT skips problems without an integer)."""
    if num_ift < 1 or num_eft < 1:
        raise ValueError(f"need at least one IFT and one EFT example, got {num_ift} and {num_eft}")
    num_train = max(num_ift, num_eft)
    # round(): 48 * 0.2 / 0.8 is 12.000000000000002 in floating point, which must not make 13.
    num_test = max(1, math.ceil(round(num_train * test_fraction / (1 - test_fraction), 9)))
    test, train = problems[:num_test], problems[num_test:]
    if len(train) < num_train:
        raise ValueError(
            f"the source has {len(problems)} problems with worked solutions, fewer than {num_train + num_test} "
            f"(training + held out); lower init.num_ift_examples / init.num_eft_examples"
        )

    def pairs(pool: list[Problem], limit: int) -> list[EFTPair]:
        found = []
        for i, problem in enumerate(pool):
            if len(found) == limit:
                break
            pair = eft_pair(problem, seed * 1_000_003 + i)
            if pair is not None:
                found.append(pair)
        return found

    return InitData(
        ift_train=train[:num_ift],
        ift_test=test,
        eft_train=pairs(train, num_eft),
        eft_test=pairs(test, num_test),
    )


def ift_rows(tokenizer: Any, problems: list[Problem]) -> list[dict[str, Any]]:
    """SFT rows of IFT: the solution prompt (ends with `Step 1:`) and the rest of the solution, then EOS;
    prompt + target is the solution written in one piece, so their token ids are its ids."""
    eos = tokenizer.eos_token or ""
    rows = []
    for p in problems:
        solution = join_steps(p.steps)
        rows.append(
            {
                "kind": "ift",
                "problem_id": p.problem_id,
                "question": p.question,
                "solution": solution,
                "answer": p.answer,
                "prompt_text": render_solution_prompt(tokenizer, p.question),
                "target_text": solution.removeprefix(step_header(1)).rstrip("\n") + eos,
            }
        )
    return rows


def eft_rows(tokenizer: Any, pairs: list[EFTPair], *, modes: tuple[JudgeMode, ...] = JUDGE_MODES) -> list[dict[str, Any]]:
    """SFT rows of EFT: each pair in both orders (right step as A, then as B), each order in every mode."""
    eos = tokenizer.eos_token or ""
    rows = []
    for item in pairs:
        requests, labels = judge_requests([item.pair])
        for request, label in zip(requests, labels, strict=True):
            explanation = explain(
                request.question, request.prefix, item.pair.good_step, item.pair.bad_step, good_letter=label
            )
            for mode in modes:
                verdict = f"{label}]]"
                target = f" {explanation}\n{DIRECT_VERDICT_PREFIX}{verdict}" if mode is JudgeMode.EXPLAIN else verdict
                rows.append(
                    {
                        "kind": f"eft_{mode}",
                        "problem_id": item.problem_id,
                        "question": request.question,
                        "prefix": request.prefix,
                        "step_a": request.step_a,
                        "step_b": request.step_b,
                        "label": label,
                        "mode": mode.value,
                        "explanation": explanation,
                        "prompt_text": render_judge_prompt(
                            tokenizer, request.question, request.prefix, request.step_a, request.step_b, mode=mode
                        ),
                        "target_text": target + eos,
                    }
                )
    return rows


def write_parquet(rows: list[dict[str, Any]], path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_init_data(tokenizer: Any, data: InitData, out_dir: str | Path) -> dict[str, Path]:
    """`ift_{train,test}.parquet` and `eft_{train,test}.parquet` in `out_dir`; returns their paths by name."""
    out = Path(out_dir)
    return {
        "ift_train": write_parquet(ift_rows(tokenizer, data.ift_train), out / "ift_train.parquet"),
        "ift_test": write_parquet(ift_rows(tokenizer, data.ift_test), out / "ift_test.parquet"),
        "eft_train": write_parquet(eft_rows(tokenizer, data.eft_train), out / "eft_train.parquet"),
        "eft_test": write_parquet(eft_rows(tokenizer, data.eft_test), out / "eft_test.parquet"),
    }
