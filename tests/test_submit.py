"""`psr-ray submit` against a real Ray head started here on loopback: the tiny run is submitted as a job,
its psr_ray metrics show up on the head's Prometheus endpoint while it runs, it SUCCEEDS, and its logs come
back. The head is stopped at the end (only it: the test session's own Ray is left alone)."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.ray


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except urllib.error.HTTPError:  # answering, if only to ask for Ray's auth token: it is up
            return
        except OSError:
            time.sleep(1)
    raise TimeoutError(url)


@pytest.fixture
def ray_head():
    # Short: Ray's unix sockets live under the temp dir and their paths are limited to 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="psrh", dir="/tmp")
    # Every port of its own: the test session's Ray already holds the default agent ports (52365, ...), and a
    # head whose job agent cannot bind answers every submission with "No available agent".
    ports = {name: free_port() for name in ("gcs", "dashboard", "metrics", "agent", "agent_grpc", "runtime_env",
                                            "client")}
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"  # the job's `python` is this venv's
    # Ray 2.60's token auth, as a secured cluster runs it: the head, the submitter and the job share a token.
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    head = subprocess.Popen(
        [
            str(BIN / "ray"), "start", "--head", "--block",
            "--node-ip-address=127.0.0.1", f"--port={ports['gcs']}",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={ports['dashboard']}",
            f"--metrics-export-port={ports['metrics']}", "--num-cpus=6",
            f"--dashboard-agent-listen-port={ports['agent']}", f"--dashboard-agent-grpc-port={ports['agent_grpc']}",
            f"--runtime-env-agent-port={ports['runtime_env']}", f"--ray-client-server-port={ports['client']}",
            f"--temp-dir={temp_dir}",
        ],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        wait_for(f"http://127.0.0.1:{ports['dashboard']}/api/version", timeout=120)
        yield ports, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # --block: the head takes its processes down with it
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_submit_tiny_run_succeeds_and_exports_metrics(ray_head, tiny_model_dir, tmp_path):
    ports, env = ray_head
    out = tmp_path / "run"
    command = [
        str(BIN / "psr-ray"), "submit", "--address", f"http://127.0.0.1:{ports['dashboard']}",
        "--config", str(ROOT / "psr_ray" / "configs" / "embedded_cpu.yaml"),
        f"model.path={tiny_model_dir}", "model.max_model_len=1024", "judge.both_orders=false",
        "rollout.max_step_tokens=8", "search.max_steps=2", "trainer.max_seq_len=256",
        "eval.limit=2", "eval.max_tokens=8", "run.num_iterations=1", "run.prompts_per_iteration=[2]",
        "run.wandb_mode=disabled", f"run.output_dir={out}",
    ]
    job = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: set[str] = set()
    deadline = time.monotonic() + 900
    while job.poll() is None and time.monotonic() < deadline:
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{ports['metrics']}/metrics", timeout=5).read().decode()
            seen |= {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line.startswith("ray_psr_")}
        except OSError:
            pass
        time.sleep(2)
    logs = job.communicate(timeout=60)[0]
    assert job.returncode == 0, logs[-4000:]
    assert "SUCCEEDED" in logs
    assert "Results" in logs and "gsm8k" in logs  # the driver's results table came back in the logs
    assert (out / "results.json").is_file()
    assert any(name.startswith("ray_psr_candidates") for name in seen), sorted(seen)
    assert any(name.startswith("ray_psr_pairs") or name.startswith("ray_psr_judge_calls") for name in seen), sorted(seen)
