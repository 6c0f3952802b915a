from __future__ import annotations

import dataclasses

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from psr_ray.data.schema import COLUMNS, STEP_PAIR_SCHEMA, StepPair, check_table, to_table
from psr_ray.testing import make_pair as base_pair


def make_pair(step_index: int = 1) -> StepPair:
    chosen = "2+2=4, \\boxed{4}"
    return base_pair("gsm8k-train-7", step_index, chosen=chosen, rejected="2+2=5", candidates=[chosen, "2+2=5"])


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
    bad = to_table([make_pair()]).set_column(COLUMNS.index("step_index"), "step_index", pa.array(["not a number"]))
    with pytest.raises(ValueError, match="does not match the schema"):
        check_table(bad)


def test_missing_required_value_is_rejected():
    with pytest.raises(ValueError, match=r"nulls in required columns \['chosen'\]"):
        to_table([dataclasses.replace(make_pair(), chosen=None)])
    table = pa.Table.from_pylist([make_pair().to_row() | {"rejected": None}], schema=STEP_PAIR_SCHEMA)
    with pytest.raises(ValueError, match="rejected"):
        check_table(table)


def test_pairs_written_before_the_margin_column_get_their_score_difference():
    old = to_table([make_pair()]).drop_columns(["margin"])
    back = check_table(old)
    assert back.schema.equals(STEP_PAIR_SCHEMA)
    assert back.column("margin").to_pylist() == [2.0]  # chosen_score 2 - rejected_score 0
