"""The set-up's torch step (`make torch-cpu`, run first by `make setup`) in fresh virtual environments: the CPU
wheel pip finds here is used without trying PyTorch's index, and where neither works the set-up stops with one
line that gives the pip command to run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNREACHABLE = "http://127.0.0.1:9/whl/cpu"  # the discard port: connection refused at once


def fresh_venv(tmp_path: Path) -> Path:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    return venv


def make_torch(venv: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["make", "-s", "-C", str(ROOT), "torch-cpu", f"VENV={venv}", f"TORCH_CPU_INDEX={UNREACHABLE}"],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip


@pytest.mark.slow  # a fresh venv, then pip against an index that refuses (two 5 s timeouts)
def test_torch_step_fails_with_one_line_giving_the_pip_command(tmp_path):
    venv = fresh_venv(tmp_path)
    # A machine where pip finds no CPU wheel and PyTorch's index is out of reach: no config files, no
    # find-links, an index that refuses connections.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env |= {"PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_RETRIES": "0",
            "PIP_TIMEOUT": "5", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}  # fmt: skip
    result = make_torch(venv, env)
    assert result.returncode != 0
    assert f"trying {UNREACHABLE}" in result.stdout  # the fallback was tried
    ours = [line for line in result.stderr.splitlines() if line.startswith("setup:")]
    assert len(ours) == 1, result.stderr
    assert f"run: {venv}/bin/python -m pip install 'torch==2.13.0+cpu' --index-url {UNREACHABLE}" in ours[0]
    assert "Traceback" not in result.stderr
    assert (venv / "setup-torch.log").read_text().count("No matching distribution found for torch==2.13.0+cpu") == 2


@pytest.mark.slow
def test_torch_step_takes_the_wheel_pip_finds_here(tmp_path):
    venv = fresh_venv(tmp_path)
    result = make_torch(venv, dict(os.environ))  # this machine: the CPU wheel is on pip's find-links
    assert result.returncode == 0, result.stdout + result.stderr
    assert "trying" not in result.stdout  # PyTorch's (unreachable) index was never needed
    version = subprocess.run([str(venv / "bin" / "python"), "-c", "import torch; print(torch.__version__)"],
                             capture_output=True, text=True, check=True, timeout=300).stdout.strip()  # fmt: skip
    assert version == "2.13.0+cpu"
