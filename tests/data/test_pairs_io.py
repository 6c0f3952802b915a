"""Parquet parts + manifest written exactly once, resumed, and streamed through Ray Data while written."""

from __future__ import annotations

import threading
import time

import pyarrow.parquet as pq
import pytest

from psr_ray.data.pairs_io import PairWriter, pairs_dir, read_manifest, read_pairs, stream_pairs_dataset
from psr_ray.data.schema import Checkpoint, StepPair, check_table
from psr_ray.testing import make_pair as base_pair


def make_pair(problem_id: str, step: int, iteration: int = 0) -> StepPair:
    return base_pair(problem_id, step, iteration, question=f"question {problem_id}", chosen="good " * 20,
                     rejected="bad " * 20, candidates=["good", "bad"], reference_answer=None, answer_correct=None)  # fmt: skip


def test_writer_flushes_parts_atomically_and_commits_in_the_manifest(tmp_path):
    writer = PairWriter(str(tmp_path), 2, flush_pairs=3, flush_seconds=1e9)
    writer.add("a", [make_pair("a", 1, 2), make_pair("a", 2, 2)])
    assert read_manifest(writer.directory)["parts"] == []  # 2 < flush_pairs: still buffered
    writer.add("b", [make_pair("b", 1, 2)])
    writer.add("c", [])  # abandoned: done, no pairs
    writer.close()
    directory = pairs_dir(str(tmp_path), 2)
    manifest = read_manifest(directory)
    assert manifest == {
        "parts": ["part-00000.parquet"],
        "done_problems": ["a", "b", "c"],
        "open_problems": {},
        "num_pairs": 3,
        "complete": True,
    }
    assert sorted(p.name for p in directory.iterdir()) == ["manifest.json", "part-00000.parquet"]
    table = check_table(pq.read_table(directory / "part-00000.parquet"))
    assert table.column("pair_id").to_pylist() == ["2/a/1", "2/a/2", "2/b/1"]
    with pytest.raises(ValueError, match="already written"):
        PairWriter(str(tmp_path), 2).add("a", [])


def test_resume_drops_uncommitted_parts_and_continues_numbering(tmp_path):
    writer = PairWriter(str(tmp_path), 0, flush_pairs=1)
    writer.add("a", [make_pair("a", 1)])
    # A crash after a part's rename but before its manifest: the part is not committed.
    orphan = writer.directory / "part-00001.parquet"
    pq.write_table(pq.read_table(writer.directory / "part-00000.parquet"), orphan)
    (writer.directory / ".part-00002.parquet.tmp").write_text("half")
    resumed = PairWriter(str(tmp_path), 0, flush_pairs=1)
    assert resumed.done_problems == {"a"} and not orphan.exists()
    assert not (writer.directory / ".part-00002.parquet.tmp").exists()
    resumed.add("b", [make_pair("b", 1)])
    resumed.close()
    assert read_manifest(resumed.directory)["parts"] == ["part-00000.parquet", "part-00001.parquet"]
    assert read_pairs(str(tmp_path), 0).column("pair_id").to_pylist() == ["0/a/1", "0/b/1"]


def test_committed_pairs_are_written_with_their_checkpoint_until_the_problem_is_done(tmp_path):
    writer = PairWriter(str(tmp_path), 0, flush_pairs=1)
    first = Checkpoint(("step one",), num_proposals=2, num_rollbacks=1)
    writer.commit("a", [make_pair("a", 1)], first)
    manifest = read_manifest(writer.directory)
    assert manifest["open_problems"] == {"a": {"steps": ["step one"], "num_proposals": 2, "num_rollbacks": 1}}
    assert manifest["done_problems"] == [] and manifest["num_pairs"] == 1
    assert PairWriter(str(tmp_path), 0).open_problems == {"a": first}  # a resumed run starts "a" there
    writer = PairWriter(str(tmp_path), 0, flush_pairs=1)
    writer.add("a", [make_pair("a", 2)])
    manifest = read_manifest(writer.directory)
    assert manifest["open_problems"] == {} and manifest["done_problems"] == ["a"] and manifest["num_pairs"] == 2
    with pytest.raises(ValueError, match="already written"):
        writer.commit("a", [], first)


def test_resume_rejects_a_damaged_checkpoint_naming_the_manifest(tmp_path):
    directory = PairWriter(str(tmp_path), 0).directory
    (directory / "manifest.json").write_text(
        '{"parts": [], "done_problems": [], "open_problems": {"a": {"steps": []}}, "complete": false}'
    )
    with pytest.raises(ValueError, match=r"manifest.json has a damaged open_problems entry"):
        PairWriter(str(tmp_path), 0)


def test_resume_rejects_a_manifest_listing_a_name_that_is_not_a_part(tmp_path):
    directory = PairWriter(str(tmp_path), 0).directory
    (directory / "manifest.json").write_text('{"parts": ["notes.txt"], "done_problems": [], "complete": false}')
    with pytest.raises(ValueError, match=r"manifest.json lists 'notes.txt', which is not a part"):
        PairWriter(str(tmp_path), 0)


@pytest.mark.ray
def test_stream_yields_rows_before_the_writer_closes(ray_cluster, tmp_path):
    """The consumer must see rows of the first parts while the producer still holds the rest back."""
    ds = stream_pairs_dataset(str(tmp_path), 5, poll_seconds=0.1, idle_timeout_s=120)
    first_rows_seen = threading.Event()
    closed_after_rows: list[bool] = []

    def produce():
        writer = PairWriter(str(tmp_path), 5, flush_pairs=2)
        writer.add("p0", [make_pair("p0", 1, 5), make_pair("p0", 2, 5)])
        writer.add("p1", [make_pair("p1", 1, 5), make_pair("p1", 2, 5)])
        closed_after_rows.append(first_rows_seen.wait(timeout=90))
        writer.add("p2", [make_pair("p2", 1, 5), make_pair("p2", 2, 5)])
        writer.close()

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    # get_dataset_shard hands each train worker a streaming_split of the dataset: read through that path.
    (shard,) = ds.streaming_split(1)
    ids = []
    for batch in shard.iter_batches(batch_size=1, batch_format="pyarrow", prefetch_batches=0):
        ids += batch.column("pair_id").to_pylist()
        first_rows_seen.set()
    producer.join(timeout=30)
    assert closed_after_rows == [True]
    assert sorted(ids) == sorted(f"5/p{i}/{s}" for i in range(3) for s in (1, 2))
    # A second pass (the next epoch) re-reads every committed part.
    again = [row["pair_id"] for row in ds.iter_rows()]
    assert sorted(again) == sorted(ids)


def test_stream_reader_times_out_without_progress(tmp_path):
    from psr_ray.data.pairs_io import _poll_parts

    PairWriter(str(tmp_path), 0)  # a manifest, never completed
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="not marked complete"):
        list(_poll_parts(str(pairs_dir(str(tmp_path), 0)), 0.05, 0.3))
    assert time.monotonic() - start < 5


def test_stream_reader_raises_when_the_writer_failed(tmp_path):
    from psr_ray.data.pairs_io import _poll_parts

    writer = PairWriter(str(tmp_path), 0, flush_pairs=100)
    writer.add("a", [make_pair("a", 1)])
    writer.fail("RuntimeError: every rollout worker died")
    reader = _poll_parts(str(writer.directory), 0.05, 60)
    assert next(reader).column("pair_id").to_pylist() == ["0/a/1"]  # committed before the failure
    with pytest.raises(RuntimeError, match="every rollout worker died"):
        next(reader)
    assert "error" not in read_manifest(PairWriter(str(tmp_path), 0).directory)  # a resumed run clears it
