"""The Arrow schema of a step preference pair: the one definition every stage reads and writes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from psr_ray.config.errors import UserError

STEP_PAIR_SCHEMA = pa.schema(
    [
        # `{iteration}/{problem_id}/{step_index}`: unique per run, so a replayed problem cannot duplicate.
        pa.field("pair_id", pa.string(), nullable=False),
        pa.field("problem_id", pa.string(), nullable=False),
        pa.field("iteration", pa.int32(), nullable=False),
        # 1-based index of the step this pair is about.
        pa.field("step_index", pa.int32(), nullable=False),
        pa.field("question", pa.string(), nullable=False),
        # The previous steps as `join_steps` writes them ("Step 1: ...\n"); the prompt is built from it.
        pa.field("prefix", pa.string(), nullable=False),
        pa.field("chosen", pa.string(), nullable=False),
        pa.field("rejected", pa.string(), nullable=False),
        pa.field("chosen_score", pa.float32(), nullable=False),
        pa.field("rejected_score", pa.float32(), nullable=False),
        # chosen_score - rejected_score as the search decided it (at least search.min_score_margin).
        pa.field("margin", pa.float32(), nullable=False),
        pa.field("num_candidates", pa.int32(), nullable=False),
        # All candidates of this step and their scores (wins), in candidate order. judge.mode=likelihood: each
        # score is the policy's mean log-prob per step token (-inf: empty), the margin in those units.
        pa.field("candidates", pa.list_(pa.string()), nullable=False),
        pa.field("candidate_scores", pa.list_(pa.float32()), nullable=False),
        # votes[i][j]: wins of candidate i over candidate j, summed over the orders judged (in `direct` judge
        # mode a win is fractional: the judge's probability). candidate_scores are the row sums.
        pa.field("vote_matrix", pa.list_(pa.list_(pa.float32())), nullable=False),
        pa.field("num_judgments", pa.int32(), nullable=False),
        pa.field("num_unparseable", pa.int32(), nullable=False),
        pa.field("judge_mode", pa.string(), nullable=False),
        pa.field("policy_version", pa.int64(), nullable=False),
        # Rollbacks this problem had gone through when the pair was emitted.
        pa.field("num_rollbacks", pa.int32(), nullable=False),
        pa.field("reference_answer", pa.string(), nullable=True),
        # Whether the finished solution's answer verified; null when unknown (no reference, or unfinished).
        pa.field("answer_correct", pa.bool_(), nullable=True),
    ]
)

COLUMNS = tuple(STEP_PAIR_SCHEMA.names)


@dataclass(frozen=True)
class StepPair:
    """One row of `STEP_PAIR_SCHEMA`; field order and names match the schema exactly (a test asserts it)."""

    pair_id: str
    problem_id: str
    iteration: int
    step_index: int
    question: str
    prefix: str
    chosen: str
    rejected: str
    chosen_score: float
    rejected_score: float
    margin: float
    num_candidates: int
    candidates: list[str]
    candidate_scores: list[float]
    vote_matrix: list[list[float]]
    num_judgments: int
    num_unparseable: int
    judge_mode: str
    policy_version: int
    num_rollbacks: int
    reference_answer: str | None = None
    answer_correct: bool | None = None

    @staticmethod
    def make_id(iteration: int, problem_id: str, step_index: int) -> str:
        return f"{iteration}/{problem_id}/{step_index}"

    def to_row(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Checkpoint:
    """Where a resumed search of a problem starts (`psr_ray.search.problem`): its committed steps, and the
    number of proposals accepted and rollbacks spent when the newest of them was decided. Kept per unfinished
    problem in the pairs manifest."""

    steps: tuple[str, ...]
    num_proposals: int
    num_rollbacks: int


def to_table(pairs: list[StepPair]) -> pa.Table:
    """Pairs -> an Arrow table of exactly `STEP_PAIR_SCHEMA` (types are checked by pyarrow)."""
    return _check_required(pa.Table.from_pylist([p.to_row() for p in pairs], schema=STEP_PAIR_SCHEMA))


def _check_required(table: pa.Table) -> pa.Table:
    # Arrow does not enforce `nullable=False` on construction or cast; a null here would reach the trainer.
    nulls = [f.name for f in STEP_PAIR_SCHEMA if not f.nullable and table.column(f.name).null_count]
    if nulls:
        raise ValueError(f"step-pair table has nulls in required columns {nulls}")
    return table


def check_table(table: pa.Table) -> pa.Table:
    """A table read back from disk, cast to the schema; a missing or mistyped column raises UserError."""
    if "margin" not in table.column_names and {"chosen_score", "rejected_score"} <= set(table.column_names):
        # Pairs written before the column existed: their margin is the score difference by definition.
        margin = pc.subtract(table.column("chosen_score"), table.column("rejected_score"))
        table = table.append_column("margin", margin)
    missing = [name for name in COLUMNS if name not in table.column_names]
    if missing:
        raise UserError(f"step-pair table lacks columns {missing}; was it written by psr_ray?")
    try:
        cast = table.select(list(COLUMNS)).cast(STEP_PAIR_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise UserError(f"step-pair table does not match the schema: {err}") from None
    return _check_required(cast)
