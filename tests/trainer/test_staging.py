"""Checkpoint staging folders: a killed worker's leftover is swept, a live one's never."""

from __future__ import annotations

import os
import subprocess
import sys

from psr_ray.trainer import staging


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_the_sweep_removes_only_folders_of_dead_processes(tmp_path):
    dead, live = dead_pid(), os.getpid()
    for name in (f"psr_ckpt_rank0_{dead}_abc", f"psr_ckpt_rank1_{live}_def", "psr_ckpt_rank0_k3j_x1y2", "other"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "shard.pt").write_bytes(b"x" * 10)
    (tmp_path / f"psr_ckpt_rank2_{dead}_file").write_text("not a folder")
    assert staging.sweep_stale(tmp_path) == [f"psr_ckpt_rank0_{dead}_abc"]
    left = sorted(p.name for p in tmp_path.iterdir())
    # The live worker's folder, an older version's (no pid in its name) and anything else stay.
    assert left == sorted([f"psr_ckpt_rank1_{live}_def", "psr_ckpt_rank0_k3j_x1y2", "other",
                           f"psr_ckpt_rank2_{dead}_file"])  # fmt: skip


def test_a_staging_folder_names_its_rank_and_process_and_is_removed_after(tmp_path, monkeypatch):
    monkeypatch.setattr(staging.tempfile, "tempdir", str(tmp_path))
    leftover = tmp_path / f"psr_ckpt_rank0_{dead_pid()}_old"  # a killed worker's
    leftover.mkdir()
    with staging.staging_dir(3) as folder:
        assert os.path.basename(folder).startswith(f"psr_ckpt_rank3_{os.getpid()}_")
        assert not leftover.exists()
    assert not os.path.exists(folder)
