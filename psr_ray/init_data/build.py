"""IFT and EFT data for the initialization SFT (M0 -> M1), as Parquet. Pure apart from file I/O.

- IFT: a worked solution in the step format (`segment.py`), prompt = the solution prompt ending in the forced
  `Step 1:`, target = the rest of the solution (from the space before step 1's first word) and EOS.
- EFT: oracle-labelled pairs of the model's own candidate steps (`candidates.py`: a right step and a wrong
  one), in both orders (right step as A, then as B: exactly half the verdicts are A), with a templated
  explanation of what is wrong with the wrong step. Rows are written for the judge mode the run uses:
  `explain` (prompt ends in `Explanation:`, target ` <explanation>\nVerdict: [[A]]`) or `direct` (prompt ends
  in `Verdict: [[`, target `A]]`); both read the verdict letter after the same `Verdict: [[`.
Problems are split before anything is built: held-out problems (the judge-accuracy pairs) come first and are
in no training file, then IFT problems, then the problems whose steps give EFT pairs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from psr_ray.config import JudgeMode
from psr_ray.config.errors import UserError
from psr_ray.core.prompts import DIRECT_VERDICT_PREFIX, render_judge_prompt, render_solution_prompt
from psr_ray.core.steps import join_steps, step_header
from psr_ray.data.problems import Problem, read_source
from psr_ray.init_data.candidates import OraclePair
from psr_ray.init_data.labelled import judge_requests
from psr_ray.init_data.segment import worked_solution


@dataclass(frozen=True)
class InitSplit:
    heldout: list[Problem]  # the judge-accuracy pairs come from these; never trained on or searched
    ift: list[Problem]
    eft: list[Problem]  # candidates are proposed on these (`candidates.oracle_pairs`) until there are enough EFT pairs


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


def split_problems(problems: list[Problem], *, num_heldout: int, num_ift: int, max_eft: int = 0) -> InitSplit:
    """Held-out problems first, then `num_ift` IFT problems, then the rest for EFT (all with worked steps; the
    first `max_eft` of them when it is not 0)."""
    if num_ift < 1:
        raise UserError(f"init.num_ift_examples must be >= 1, got {num_ift}")
    if len(problems) < num_heldout + num_ift + 1:
        raise UserError(
            f"the source has {len(problems)} problems with worked solutions, fewer than {num_heldout + num_ift + 1} "
            f"(held out + IFT + at least one for EFT); lower init.num_ift_examples or init.num_heldout_problems"
        )
    eft = problems[num_heldout + num_ift :]
    return InitSplit(problems[:num_heldout], problems[num_heldout : num_heldout + num_ift],
                     eft[:max_eft] if max_eft else eft)  # fmt: skip


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


def eft_rows(tokenizer: Any, pairs: list[OraclePair], *, mode: JudgeMode) -> list[dict[str, Any]]:
    """SFT rows of EFT in judge mode `mode`: each pair in both orders (right step as A, then as B)."""
    eos = tokenizer.eos_token or ""
    rows = []
    for item in pairs:
        requests, labels = judge_requests([item.pair])
        for request, label in zip(requests, labels, strict=True):
            explanation = explain_pair(request.step_a, request.step_b, good_letter=label, why_bad=item.why_bad)
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


def explain_pair(step_a: str, step_b: str, *, good_letter: str, why_bad: str) -> str:
    """An EFT explanation: each step's equation redone (the check a small model can learn: computing, as it
    does when solving, then comparing), then why the wrong one is wrong."""
    from psr_ray.oracle.exact import recompute

    bad_letter = "B" if good_letter == "A" else "A"
    checks = [f"Step {letter}: {text}." for letter, step in (("A", step_a), ("B", step_b))
              if (text := recompute(step)) is not None]  # fmt: skip
    return " ".join([*checks, f"Step {bad_letter} is wrong: {why_bad}. Step {good_letter} is correct."])


def loss_shares(tokenizer: Any, parts: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """Each part's share of the SFT loss (rows of `parts`, e.g. {"ift": ..., "eft": ...}): `rows`, the share it
    has (the SFT loss is a mean over rows, `trainer.loss.sft_row_losses`), and `tokens`, the share a mean over
    target tokens would give it (the verdicts' 0.19% before rows were weighed alike)."""
    rows = {name: len(part) for name, part in parts.items()}
    tokens = {name: sum(len(tokenizer(r["target_text"], add_special_tokens=False)["input_ids"]) for r in part)
              for name, part in parts.items()}  # fmt: skip
    return {
        name: {"rows": rows[name] / max(1, sum(rows.values())), "tokens": tokens[name] / max(1, sum(tokens.values()))}
        for name in parts
    }


def pair_rows(pairs: list[OraclePair]) -> list[dict[str, Any]]:
    """Oracle pairs as plain rows (held-out judge pairs on disk): problem_id, question, prefix, good, bad."""
    return [{"problem_id": p.problem_id, "question": p.pair.question, "prefix": p.pair.prefix,
             "good_step": p.pair.good_step, "bad_step": p.pair.bad_step, "why_bad": p.why_bad,
             "num_candidates": p.num_candidates, "num_right": p.num_right} for p in pairs]  # fmt: skip


def read_pairs(path: str | Path) -> list[OraclePair]:
    """The rows `pair_rows` wrote, back as OraclePairs."""
    import pyarrow.parquet as pq

    from psr_ray.init_data.labelled import LabelledPair

    return [OraclePair(r["problem_id"], LabelledPair(r["question"], r["prefix"], r["good_step"], r["bad_step"]),
                       r["num_candidates"], r["num_right"], r["why_bad"])
            for r in pq.read_table(path).to_pylist()]  # fmt: skip


def write_parquet(rows: list[dict[str, Any]], path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from psr_ray.runtime.durable import write_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows)
    write_atomic(path, lambda tmp: pq.write_table(table, tmp))  # durable before the marker that vouches for it
    return path
