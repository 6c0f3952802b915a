"""Where a trainer worker stages its checkpoint before Ray Train persists it, and the sweep of the stagings
that killed workers left behind.

A staging folder is `<temp dir>/psr_ckpt_rank<rank>_<pid>_<random>`. `TemporaryDirectory` removes it once the
save returns, but a SIGKILLed worker (a fault, the OOM killer, `ray stop`) leaves it with its whole DeepSpeed
shard inside: GBs per rank at 7B, on every fault, until the node's disk is full. So each worker, before it
stages, removes the folders of processes no longer alive on its node (pids are per node, as temp dirs are).
Folders without a pid in their name (older versions) and of live processes are left alone.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

PREFIX = "psr_ckpt_rank"
_NAME = re.compile(rf"^{PREFIX}\d+_(\d+)_")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive, and not ours to judge
        return True
    return True


def sweep_stale(directory: str | os.PathLike | None = None) -> list[str]:
    """Removes the staging folders of dead processes under `directory` (default: the temp dir); returns
    their names."""
    removed = []
    for path in sorted(Path(directory or tempfile.gettempdir()).glob(f"{PREFIX}*")):
        match = _NAME.match(path.name)
        if match and path.is_dir() and not _alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed


def staging_dir(rank: int) -> tempfile.TemporaryDirectory[str]:
    """A fresh staging folder for this rank's checkpoint (removed on exit), after sweeping dead ones."""
    sweep_stale()
    return tempfile.TemporaryDirectory(prefix=f"{PREFIX}{rank}_{os.getpid()}_")
