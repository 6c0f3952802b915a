"""Step pairs on disk, written exactly once, and read back as a Ray Dataset that streams while they are made.

Layout of one iteration, `<output_dir>/pairs/iter_<i>/`:
  part-00000.parquet ...   one file per flushed chunk (temp name, fsync, rename, fsync of the folder:
                           never seen half-written, on disk before the manifest names it)
  manifest.json            the commit point (written the same way): the parts written so far, the problems
                           finished so far (their pairs are all in those parts), the checkpoint of each
                           problem with pairs written but not finished (`open_problems`), and `complete`.
A part is visible only once the manifest lists it; a part not listed (a crash between the rename and the
manifest) is deleted on resume and its problems are searched again from the checkpoint the manifest names (or
from the start), so every pair_id lands exactly once.

Streaming: `stream_pairs_dataset` builds a Dataset from `ManifestDatasource`,
whose single read task polls the manifest and yields each new part as soon as it is listed, until
`complete`. The dataset's own `target_max_block_size` is tiny, so Ray Data emits every row of a part as
a block at once instead of merging the whole read into one block (the default; None would do the same).
One-row blocks cost well under a millisecond each; an iteration has thousands of pairs, not millions.
Consumers see a row as soon as it is committed with `iter_batches(prefetch_batches=0)`; the default
prefetch holds the newest batch back until the next one arrives (seen with Ray 2.60), harmless for
training. Each execution (every `iter_batches` /
`iter_torch_batches` on a `get_dataset_shard`) re-reads from the first part, so epochs see all pairs.
The read task is pinned to the node that builds the dataset (the driver, which writes the parts), so a
node-local `output_dir` works on a multi-node cluster.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from psr_ray.data.schema import STEP_PAIR_SCHEMA, Checkpoint, StepPair, check_table, to_table
from psr_ray.runtime import kill_windows
from psr_ray.runtime.durable import write_atomic

MANIFEST = "manifest.json"
_PART = re.compile(r"^part-(\d+)\.parquet$")


def pairs_dir(output_dir: str, iteration: int) -> Path:
    return Path(os.path.expanduser(output_dir)) / "pairs" / f"iter_{iteration}"


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """The manifest of an iteration folder; an empty one when none was written yet."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return {"parts": [], "done_problems": [], "open_problems": {}, "num_pairs": 0, "complete": False}
    with path.open() as f:
        return json.load(f)


def _write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    write_atomic(directory / MANIFEST, json.dumps(manifest))


def _part_number(directory: Path, name: str) -> int:
    """The number of a part the manifest lists; a name not of that form is a damaged manifest."""
    match = _PART.match(name)
    if match is None:
        raise ValueError(f"{directory / MANIFEST} lists {name!r}, which is not a part (part-<number>.parquet)")
    return int(match.group(1))


class PairWriter:
    """Appends step pairs to Parquet parts under `pairs_dir(output_dir, iteration)`.

    `commit()` buffers a problem's committed pairs with its checkpoint while it is still searched; `add()`
    buffers one finished problem's remaining pairs (may be empty: an abandoned problem is still done); a chunk
    is flushed once it holds `flush_pairs` pairs or is `flush_seconds` old. Opening a folder that already has a
    manifest resumes it: `done_problems` says which problems to skip, `open_problems` where to resume others.
    """

    # A committed pair reaches the stream within `flush_seconds`: small against a step's decision time (about a
    # minute on CPU), and a part every 2 s or more is nothing for the reader.
    def __init__(self, output_dir: str, iteration: int, *, flush_pairs: int = 64, flush_seconds: float = 2.0):
        self.directory = pairs_dir(output_dir, iteration)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.iteration = iteration
        self.flush_pairs = flush_pairs
        self.flush_seconds = flush_seconds
        self._manifest = read_manifest(self.directory)
        listed = set(self._manifest["parts"])
        for path in self.directory.iterdir():  # leftovers of a crash: unlisted parts and temp files
            if (_PART.match(path.name) and path.name not in listed) or path.name.endswith(".tmp"):
                path.unlink()
        numbers = [_part_number(self.directory, name) for name in listed]
        self._next_part = max(numbers, default=-1) + 1
        self.done_problems: set[str] = set(self._manifest["done_problems"])
        self.open_problems = _checkpoints(self.directory, self._manifest.get("open_problems", {}))
        self._pairs: list[StepPair] = []
        self._problems: list[str] = []
        self._open: dict[str, Checkpoint] = {}  # checkpoints buffered with the chunk
        self._oldest: float | None = None
        self._manifest["complete"] = False
        self._manifest.pop("error", None)
        _write_manifest(self.directory, self._manifest)

    @property
    def num_pairs(self) -> int:
        """Pairs committed so far, earlier runs of this iteration included."""
        return int(self._manifest["num_pairs"])

    def add(self, problem_id: str, pairs: list[StepPair]) -> None:
        self._buffer(problem_id, pairs)
        self._problems.append(problem_id)
        self._open.pop(problem_id, None)
        self.maybe_flush()

    def commit(self, problem_id: str, pairs: list[StepPair], checkpoint: Checkpoint) -> None:
        """Buffers pairs of a problem still being searched; a resumed run restarts it from `checkpoint`."""
        self._buffer(problem_id, pairs)
        self._open[problem_id] = checkpoint
        self.maybe_flush()

    def _buffer(self, problem_id: str, pairs: list[StepPair]) -> None:
        if problem_id in self.done_problems or problem_id in self._problems:
            raise ValueError(f"problem {problem_id!r} was already written for iteration {self.iteration}")
        self._pairs.extend(pairs)
        self._oldest = self._oldest or time.monotonic()

    def maybe_flush(self) -> None:
        """Flushes when the chunk is big or old enough; cheap to call often."""
        old = self._oldest is not None and time.monotonic() - self._oldest >= self.flush_seconds
        if len(self._pairs) >= self.flush_pairs or old:
            self.flush()

    def flush(self) -> None:
        if not self._problems and not self._open:
            return
        parts = list(self._manifest["parts"])
        if self._pairs:
            kill_windows.reached("search.before_flush")
            name = f"part-{self._next_part:05d}.parquet"
            table = to_table(self._pairs)
            write_atomic(self.directory / name, lambda tmp: pq.write_table(table, tmp))
            parts.append(name)
            self._next_part += 1
        self.done_problems.update(self._problems)
        self.open_problems.update(self._open)
        for problem_id in self._problems:
            self.open_problems.pop(problem_id, None)
        self._manifest = {
            "parts": parts,
            "done_problems": sorted(self.done_problems),
            "open_problems": {k: dataclasses.asdict(v) for k, v in sorted(self.open_problems.items())},
            "num_pairs": self.num_pairs + len(self._pairs),
            "complete": False,
        }
        _write_manifest(self.directory, self._manifest)
        wrote_part = bool(self._pairs)
        self._pairs, self._problems, self._open, self._oldest = [], [], {}, None
        if wrote_part:
            kill_windows.reached("search.after_flush")

    def close(self, *, complete: bool = True) -> None:
        """Flushes the rest; `complete` tells streaming readers that no more parts will come."""
        self.flush()
        self._manifest["complete"] = complete
        _write_manifest(self.directory, self._manifest)

    def fail(self, reason: str) -> None:
        """Commits what is finished and tells streaming readers that generation stopped with an error
        (they raise instead of waiting); a later run of the iteration resumes from here."""
        self.flush()
        self._manifest["error"] = reason
        _write_manifest(self.directory, self._manifest)


def _checkpoints(directory: Path, listed: Any) -> dict[str, Checkpoint]:
    """The manifest's `open_problems`, checked: a damaged entry names the manifest."""
    try:
        return {
            str(k): Checkpoint(tuple(str(x) for x in v["steps"]), int(v["num_proposals"]), int(v["num_rollbacks"]))
            for k, v in dict(listed).items()
        }
    except (TypeError, ValueError, KeyError) as err:
        raise ValueError(f"{directory / MANIFEST} has a damaged open_problems entry ({err!r})") from None


def read_pairs(output_dir: str, iteration: int) -> pa.Table:
    """All committed pairs of an iteration as one table of `STEP_PAIR_SCHEMA` (checked)."""
    directory = pairs_dir(output_dir, iteration)
    parts = read_manifest(directory)["parts"]
    tables = [check_table(pq.read_table(directory / name)) for name in parts]
    return pa.concat_tables(tables) if tables else STEP_PAIR_SCHEMA.empty_table()


def _poll_parts(directory: str, poll_seconds: float, idle_timeout_s: float):
    """Yields each committed part's table, in order, until the manifest says `complete`."""
    seen = 0
    last_progress = time.monotonic()
    while True:
        manifest = read_manifest(directory)
        parts = manifest["parts"]
        for name in parts[seen:]:
            yield check_table(pq.read_table(Path(directory) / name))
        if len(parts) > seen:
            seen, last_progress = len(parts), time.monotonic()
        elif manifest.get("error"):
            raise RuntimeError(f"step-pair generation for {directory} failed: {manifest['error']}")
        elif manifest["complete"]:
            return
        elif time.monotonic() - last_progress > idle_timeout_s:
            raise TimeoutError(
                f"no new step pairs in {directory} for {idle_timeout_s:.0f} s and generation is not marked "
                "complete; did the generator die? Raise idle_timeout_s if steps are this slow."
            )
        else:
            time.sleep(poll_seconds)


def _manifest_datasource(directory: str, poll_seconds: float, idle_timeout_s: float):
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class ManifestDatasource(Datasource):
        """One read task that follows an iteration's manifest (see the module docstring)."""

        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
            meta = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
            return [ReadTask(lambda: _poll_parts(directory, poll_seconds, idle_timeout_s), meta, STEP_PAIR_SCHEMA)]

        def get_name(self) -> str:
            return "StepPairManifest"

        @property
        def supports_distributed_reads(self) -> bool:
            return False  # Ray Data then pins the read to the node that builds the dataset

    return ManifestDatasource()


def stream_pairs_dataset(
    output_dir: str,
    iteration: int,
    *,
    poll_seconds: float = 0.5,
    idle_timeout_s: float = 3600.0,
):
    """A `ray.data.Dataset` of the iteration's step pairs that yields rows while they are being generated
    (it may be built before generation starts) and ends once the writer is closed. A row reaches the
    consumer within about `poll_seconds` of being committed."""
    import ray

    directory = str(pairs_dir(output_dir, iteration))
    ds = ray.data.read_datasource(
        _manifest_datasource(directory, poll_seconds, idle_timeout_s),
        override_num_blocks=1,
        num_cpus=0,  # it mostly sleeps; holding a CPU for the whole generation would starve the engines
    )
    # Tiny: every row becomes its own block as soon as its part is read (None holds the whole read back).
    ds.context.target_max_block_size = 1
    return ds
