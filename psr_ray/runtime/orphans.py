"""A run process that outlives its node's raylet ends itself (issue 26: after a raylet died alone, its engines
kept running, and serving, until the GCS marked the node dead; on a cluster they would keep holding GPUs).

Ray starts every worker as a child of its node's raylet, so a raylet that dies leaves its workers re-parented
(to init, or a subreaper). `exit_when_orphaned` watches for that from a daemon thread and ends the process;
Ray restarts the actor elsewhere once the GCS marks the node dead, as for any lost node.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable

POLL_S = 1.0


def exit_when_orphaned(what: str, *, poll_s: float = POLL_S,
                       on_orphan: Callable[[int], None] | None = None) -> threading.Thread | None:  # fmt: skip
    """Starts the watch (None when there is no parent to watch: started by PID 1). `on_orphan(parent_pid)`
    replaces the exit (tests)."""
    parent = os.getppid()
    if parent <= 1:
        return None

    def leave(parent_pid: int) -> None:
        try:  # its log may have gone with the raylet: the exit must not depend on it
            print(f"[psr_ray] {what}: its raylet (pid {parent_pid}) is gone; exiting so that it holds nothing",
                  file=sys.stderr, flush=True)  # fmt: skip
        except (OSError, ValueError):
            pass
        os._exit(1)  # no cleanup that could wait on the dead raylet

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        (on_orphan or leave)(parent)

    thread = threading.Thread(target=watch, name="psr-orphan-watch", daemon=True)
    thread.start()
    return thread
