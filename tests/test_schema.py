from __future__ import annotations

import dataclasses

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from psr_ray.data.schema import COLUMNS, STEP_PAIR_SCHEMA, StepPair, check_table, to_table


def make_pair(step_index: int = 1) -> StepPair:
    return StepPair(
        pair_id=StepPair.make_id(0, "gsm8k-train-7", step_index),
        problem_id="gsm8k-train-7",
        iteration=0,
        step_index=step_index,
        question="What is 2+2?",
        prefix="",
        chosen="2+2=4, \\boxed{4}",
        rejected="2+2=5",
        chosen_score=2.0,
        rejected_score=0.0,
        num_candidates=2,
        candidates=["2+2=4, \\boxed{4}", "2+2=5"],
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


def test_dataclass_matches_schema_exactly():
    assert tuple(f.name for f in dataclasses.fields(StepPair)) == COLUMNS


def test_pair_id_format():
    assert make_pair(3).pair_id == "0/gsm8k-train-7/3"


def test_round_trip_through_parquet(tmp_path):
    table = to_table([make_pair(1), make_pair(2)])
    assert table.schema.equals(STEP_PAIR_SCHEMA)
    pq.write_table(table, tmp_path / "p.parquet")
    back = check_table(pq.read_table(tmp_path / "p.parquet"))
    assert back.to_pylist() == table.to_pylist()
    assert back.column("vote_matrix").to_pylist()[0] == [[0.0, 2.0], [0.0, 0.0]]


def test_nullable_provenance():
    pair = dataclasses.replace(make_pair(), reference_answer=None, answer_correct=None)
    assert to_table([pair]).column("answer_correct").to_pylist() == [None]


def test_check_table_rejects_foreign_tables():
    with pytest.raises(ValueError, match="lacks columns"):
        check_table(pa.table({"pair_id": ["x"]}))
    bad = to_table([make_pair()]).set_column(
        COLUMNS.index("step_index"), "step_index", pa.array(["not a number"])
    )
    with pytest.raises(ValueError, match="does not match the schema"):
        check_table(bad)


def test_missing_required_value_is_rejected():
    with pytest.raises(ValueError, match=r"nulls in required columns \['chosen'\]"):
        to_table([dataclasses.replace(make_pair(), chosen=None)])
    table = pa.Table.from_pylist([make_pair().to_row() | {"rejected": None}], schema=STEP_PAIR_SCHEMA)
    with pytest.raises(ValueError, match="rejected"):
        check_table(table)
