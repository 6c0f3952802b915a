"""A process whose parent (on a Ray node: the raylet) dies ends itself (runtime/orphans.py). Real processes:
a parent starts the child and exits, leaving it re-parented, as a raylet's death leaves its workers."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from psr_ray.config import REPO_ROOT
from tests.scenarios.multinode import alive

CHILD = """
import sys, time
if sys.argv[1] == "watched":
    from psr_ray.runtime.orphans import exit_when_orphaned
    exit_when_orphaned("test child", poll_s=0.05)
print("started", flush=True)
time.sleep(60)
"""
# Starts the child, waits until it runs, prints its pid and exits without waiting for it.
PARENT = """
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], stdout=subprocess.PIPE,
                         stderr=open(sys.argv[3], "w"), text=True)
assert child.stdout.readline().strip() == "started"
print(child.pid, flush=True)
"""


def orphan(kind: str, log: Path) -> int:
    done = subprocess.run([sys.executable, "-c", PARENT, CHILD, kind, str(log)], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60, env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


def test_a_process_whose_parent_died_exits_and_says_why(tmp_path):
    watched, unwatched = orphan("watched", tmp_path / "watched.log"), orphan("unwatched", tmp_path / "other.log")
    try:
        deadline = time.monotonic() + 10
        while alive(watched) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(watched)
        assert alive(unwatched)  # without the watch, an orphan runs on (what a raylet's death left behind)
        assert "[psr_ray] test child: its raylet (pid " in (tmp_path / "watched.log").read_text()
    finally:
        subprocess.run(["kill", "-9", str(unwatched)], check=False)
