"""What a run has finished, on disk, so a killed run resumes without redoing work.

`<output_dir>/state.json` records, per iteration, each finished stage with its summary, written atomically
(temp file + rename) after the stage's outputs are on disk. A stage is done only once it is recorded; a
stage that was running when the run died is redone from its own partial outputs (the search skips problems
whose pairs were flushed; the trainer resumes from its latest complete checkpoint).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

STAGES = ("search", "train", "sync", "eval")


class RunState:
    def __init__(self, output_dir: str | os.PathLike):
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / "state.json"
        self.data: dict[str, Any] = {"iterations": {}, "config": None}
        if self.path.is_file():
            try:
                self.data = json.loads(self.path.read_text())
            except json.JSONDecodeError as err:
                raise ValueError(f"{self.path} is corrupt ({err}); move it away to start this run over") from None

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

    def set_config(self, config: dict[str, Any]) -> None:
        self.data["config"] = config
        self._write()

    def _write(self) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2, sort_keys=True))
        os.replace(tmp, self.path)
