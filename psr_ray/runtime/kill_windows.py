"""Named windows where the fault tests kill a process, for real (SIGKILL), at exactly that point.

Off unless the environment variable `PSR_RAY_KILL_DIR` names a folder; in production `reached()` returns at
once. A test arms windows by writing `<dir>/armed`, one per line: `WINDOW` or `WINDOW@N` (the N-th time a
process reaches it). The process that reaches an armed window creates `<dir>/ready.<WINDOW>.json` (its pid,
host, window) and then sleeps until it is killed, so the kill lands inside the window however fast the run
is. Each window fires once (the file is created exclusively): a restarted trainer worker that reaches it
again carries on.

The variable must reach every process of the run: set it before Ray starts (Ray workers inherit the
raylet's environment) or in the job's runtime_env (`env_vars`).
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections import Counter
from pathlib import Path

ENV = "PSR_RAY_KILL_DIR"
ARMED = "armed"

WINDOWS = {
    "search.before_flush": "finished problems' pairs are buffered in the driver, their Parquet part not written",
    "search.after_flush": "a Parquet part and the manifest listing it are committed; the search goes on",
    "train.after_step": "a trainer worker finished an optimizer step (reported); the fit goes on",
    "sync.after_push": "the new weights are in every engine; no checkpoint or state.json says so yet",
    "checkpoint.persist": "the checkpoint's files are in storage and fsynced; its marker is not written",
    "eval": "an iteration's answers are generated and scored; the eval is not recorded",
    "state.write": "a new state.json is written and fsynced under a temp name, not yet renamed into place",
}

_counts: Counter[str] = Counter()


def ready_file(folder: str | os.PathLike, window: str) -> Path:
    return Path(folder) / f"ready.{window}.json"


def reached(window: str) -> None:
    """Marks that this process reached `window`; blocks forever if a test armed it (see module doc)."""
    folder = os.environ.get(ENV)
    if not folder:
        return
    assert window in WINDOWS, window
    _counts[window] += 1
    try:
        armed = (Path(folder) / ARMED).read_text().split()
    except FileNotFoundError:
        return
    if not any(spec.partition("@")[0] == window and _counts[window] == int(spec.partition("@")[2] or 1)
               for spec in armed):  # fmt: skip
        return
    info = {"pid": os.getpid(), "host": socket.gethostname(), "window": window, "occurrence": _counts[window]}
    tmp = Path(folder) / f".ready.{os.getpid()}"
    tmp.write_text(json.dumps(info))
    try:
        os.link(tmp, ready_file(folder, window))  # exclusive and whole: a reader never sees it half-written
    except FileExistsError:
        return  # fired already, in this process or another
    finally:
        tmp.unlink()
    while True:  # the test kills this process (or the driver that owns it) now
        time.sleep(1.0)
