"""Writes that survive a crash: fsync the file, rename it into place, fsync the directory.

A rename alone is atomic for other processes but not durable: after a power loss the new name may point at a
file whose data never reached the disk, or the rename itself may be lost. Every commit point of a run (Parquet
parts, the pairs manifest, `state.json`, checkpoint markers) goes through `write_atomic`, so what a commit
point names is on disk before the commit point is.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path


def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Makes the directory's entries (names created, renamed or removed in it) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, data: bytes | str | Callable[[Path], None]) -> None:
    """Writes `data` (bytes, text, or a function that writes the file it is given) to a temp file beside
    `path`, fsyncs it, renames it to `path` and fsyncs the directory. Readers see the old file or the new
    one, never a part; after a crash the new one is either complete or absent. The temp name is the writer's
    own (two writers of one path never share a half-written temp; the last rename wins) and ends in `.tmp`,
    which readers of a folder skip and clean (data/pairs_io.py); a write that fails removes it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        if callable(data):
            data(tmp)
        else:
            tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_tree(root: str | os.PathLike[str]) -> int:
    """Fsyncs every file and directory under `root` (deepest first, `root` last); returns the file count.
    Used before a marker that vouches for files some other process wrote."""
    count = 0
    for directory, _, files in os.walk(root, topdown=False):
        for name in files:
            fsync_file(os.path.join(directory, name))
            count += 1
        fsync_dir(directory)
    return count
