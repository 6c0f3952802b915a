"""Named windows where the fault tests kill a process, for real (SIGKILL), at exactly that point.

Off unless the environment variable `PSR_RAY_KILL_DIR` names a folder; in production `reached()` returns at
once. A test arms one window by writing `<dir>/armed` (`WINDOW` or `WINDOW@N`: the N-th time this process
reaches it). The process that reaches the armed window creates `<dir>/ready.json` (its pid, host, window)
and then sleeps until it is killed, so the kill lands inside the window however fast the run is. Only the
first process to get there fires (the file is created exclusively): a restarted trainer worker that
reaches the window again carries on.

The variable must be set before Ray starts (Ray workers inherit the raylet's environment) or passed in the
job's runtime_env; the driver, the trainer workers and the engines then all see the same folder.
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
READY = "ready.json"

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


def reached(window: str) -> None:
    """Marks that this process reached `window`; blocks forever if a test armed it (see module doc)."""
    folder = os.environ.get(ENV)
    if not folder:
        return
    assert window in WINDOWS, window
    _counts[window] += 1
    try:
        armed = (Path(folder) / ARMED).read_text().strip()
    except FileNotFoundError:
        return
    name, _, nth = armed.partition("@")
    if name != window or _counts[window] != int(nth or 1):
        return
    info = {"pid": os.getpid(), "host": socket.gethostname(), "window": armed}
    tmp = Path(folder) / f".ready.{os.getpid()}"
    tmp.write_text(json.dumps(info))
    try:
        os.link(tmp, Path(folder) / READY)  # exclusive and whole: a reader never sees it half-written
    except FileExistsError:
        return  # another process fired already
    finally:
        tmp.unlink()
    while True:  # the test kills this process (or the driver that owns it) now
        time.sleep(1.0)
