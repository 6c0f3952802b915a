"""What a run has finished, on disk, so a killed run resumes without redoing work.

`<output_dir>/state.json` records, per iteration, each finished stage with its summary, written atomically
and durably (temp file, fsync, rename, fsync of the folder) after the stage's outputs are on disk. It is
first written once the run has started (Ray up, problems loaded, engines ready), so a run that failed to
start leaves nothing behind that blocks the corrected one. A stage is done only once it is recorded; a
stage that was running when the run died is redone from its own partial outputs (the search skips problems
whose pairs were flushed; the trainer resumes from its latest complete checkpoint).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from psr_ray.config.errors import UserError
from psr_ray.runtime import kill_windows
from psr_ray.runtime.durable import fsync_dir, fsync_file

STAGES = ("search", "train", "sync", "eval")


class RunState:
    def __init__(self, output_dir: str | os.PathLike):
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / "state.json"
        self.data: dict[str, Any] = {"iterations": {}, "config": None}
        if self.path.is_file():
            try:
                self.data = json.loads(self.path.read_text())
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
                raise UserError(f"{self.path} is corrupt ({err}); move it away to start this run over") from None
            if not (isinstance(self.data, dict) and isinstance(self.data.get("iterations"), dict)):
                raise UserError(
                    f"{self.path} is not a psr_ray run state (no 'iterations' mapping); "
                    "move it away to start this run over"
                )

    @property
    def exists(self) -> bool:
        return self.path.is_file()

    def stage(self, iteration: int, stage: str) -> dict[str, Any] | None:
        """The recorded summary of a finished stage, or None."""
        assert stage in STAGES, stage
        return self.data["iterations"].get(str(iteration), {}).get(stage)

    def done(self, iteration: int, stage: str) -> bool:
        return self.stage(iteration, stage) is not None

    def record(self, iteration: int, stage: str, summary: dict[str, Any]) -> None:
        assert stage in STAGES, stage
        self.data["iterations"].setdefault(str(iteration), {})[stage] = summary
        self._write()

    def record_failure(self, iteration: int, stage: str, summary: dict[str, Any], *, error: str) -> None:
        """A stage that produced outputs and then failed a check (e.g. a fit that did not train every committed
        pair exactly once per epoch): its summary and the error, kept under the iteration's `failed` for the
        post-mortem. The stage stays not done, so nothing builds on it."""
        assert stage in STAGES, stage
        failed = self.data["iterations"].setdefault(str(iteration), {}).setdefault("failed", {})
        failed[stage] = {**summary, "error": error}
        self._write()

    def record_peak(self, stage: str, gib: float, roles: dict[str, float] | None = None,
                    nodes: dict[str, tuple[float, dict[str, float]]] | None = None) -> None:  # fmt: skip
        """The peak memory (GiB, `psr_ray.runtime.memory`) of a console stage, e.g. `iter 1/2 search+train`, its
        split by process role at that peak and, on a cluster, each node's (`psr_ray.runtime.node_memory`). Kept
        with the next write (a record, or `flush()`): no extra commit point of its own."""
        self.data.setdefault("peak_memory_gib", {})[stage] = round(gib, 3)
        if roles:
            self.data.setdefault("peak_memory_roles_gib", {})[stage] = {k: round(v, 3) for k, v in roles.items()}
        if nodes:
            self.data.setdefault("peak_memory_nodes_gib", {})[stage] = {
                node: {"peak": round(node_gib, 3), "roles": {k: round(v, 3) for k, v in node_roles.items()}}
                for node, (node_gib, node_roles) in nodes.items()
            }

    def flush(self) -> None:
        self._write()

    def finished_summary(self) -> str:
        done = [f"{k}:{'+'.join(s for s in STAGES if self.done(int(k), s))}"
                for k in sorted(self.data["iterations"], key=int)]  # fmt: skip
        return "finished " + (", ".join(done) if done else "nothing yet")

    def set_config(self, config: dict[str, Any]) -> None:
        self.data["config"] = config
        self._write()

    def _write(self) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2, sort_keys=True))
        fsync_file(tmp)
        kill_windows.reached("state.write")
        os.replace(tmp, self.path)
        fsync_dir(self.output_dir)


def check_trained_pairs(iteration: int, *, trained: int, committed: int, epochs: int, model_dir: str = "") -> None:
    """The exactly-once promise: the trainer read every pair the search committed once per epoch, so
    `trained == committed x epochs`. A fit that trained more (a pair read twice) or fewer (a pair lost) fails
    the run here with a RuntimeError, an internal error, before its model is served or built on."""
    expected = committed * epochs
    if trained == expected:
        return
    kept = f"; the trained model stays in {model_dir} for inspection" if model_dir else ""
    raise RuntimeError(
        f"iteration {iteration}: the trainer trained {trained} pairs, expected {expected} (the {committed} pairs "
        f"the search committed x {epochs} epochs): a pair was {'read twice' if trained > expected else 'lost'}, "
        f"which breaks the exactly-once promise, so the run stops here{kept}"
    )
