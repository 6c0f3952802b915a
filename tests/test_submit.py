"""`psr-ray submit` against a real Ray head started here on loopback with token auth, as a secured cluster runs:
without a token it stops with one line; with one, the tiny run (engines and trainer pinned to node-group
resources the head declares) SUCCEEDS, its live metrics (train loss during the fit, tokens per engine role
from vLLM's own stats) show on the head's Prometheus endpoint, and the console in its logs is for people. A
multi-node config whose output_dir is not shared is refused by the job, on the cluster, not by the laptop.
The head is stopped at the end (only it: the test session's own Ray is left alone)."""

from __future__ import annotations

import json
import os
import re
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

from psr_ray.runtime import submit

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# The tiny random model on the embedded preset: no init, GSM8K prompts, and pairs from any soft-vote margin
# (psr_ray.testing.TINY_OVERRIDES says why).
TINY_RUN = ("model.max_model_len=1024", "init.run_first=false", "data.source=embedded:gsm8k", "eval.benchmarks=[gsm8k]",
            "search.min_score_margin=0.01", "judge.both_orders=false", "rollout.max_step_tokens=8", "search.max_steps=2",
            "trainer.max_seq_len=256", "eval.limit=2", "eval.max_tokens=8", "run.num_iterations=1",
            "run.prompts_per_iteration=[2]", "run.wandb_mode=disabled")  # fmt: skip
# judge.num_engines=1: the embedded preset judges on the rollout engine; this test pins a judge engine of its own.
# Two trainer workers (the preset has one on two CPUs): each must land on the trainer node group.
PINNED = (
    "rollout.node_resource=psr_engine",
    "judge.num_engines=1",
    "judge.node_resource=psr_engine",
    "trainer.node_resource=psr_trainer",
    "trainer.num_workers=2",
    "trainer.num_cpus_per_worker=1",
)


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


def scrape(port: int) -> list[str]:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return []
    return [line for line in text.splitlines() if line.startswith(("ray_psr_", "ray_vllm_"))]


@pytest.fixture(scope="module")
def ray_head():
    """One head for this module's tests (a head takes ~15 s to start here)."""
    # Short: Ray's unix sockets live under the temp dir and their paths are limited to 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="psrh", dir="/tmp")
    # Every port of its own: the test session's Ray already holds the default agent ports (52365, ...), and a
    # head whose job agent cannot bind answers every submission with "No available agent".
    ports = {
        name: free_port() for name in ("gcs", "dashboard", "metrics", "agent", "agent_grpc", "runtime_env", "client")
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"  # the job's `python` is this venv's
    # Ray 2.60's token auth, as a secured cluster runs it: the head, the submitter and the job share a token.
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    env["RAY_metrics_report_interval_ms"] = "2000"  # a live view every 2 s (10 s by default)
    head = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={ports['gcs']}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={ports['dashboard']}",
            f"--metrics-export-port={ports['metrics']}",
            "--num-cpus=6",
            # The node groups of cluster/, on one node: engines and trainer workers must ask for them.
            '--resources={"psr_engine": 4, "psr_trainer": 2}',
            f"--dashboard-agent-listen-port={ports['agent']}",
            f"--dashboard-agent-grpc-port={ports['agent_grpc']}",
            f"--runtime-env-agent-port={ports['runtime_env']}",
            f"--ray-client-server-port={ports['client']}",
            f"--temp-dir={temp_dir}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
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


def actors(ports: dict[str, int], token: str) -> list[dict]:
    """Every actor the head knows (dead ones too), with the resources it asked for, from Ray's state API."""
    request = urllib.request.Request(f"http://127.0.0.1:{ports['dashboard']}/api/v0/actors?detail=1&limit=10000",
                                     headers={"Authorization": f"Bearer {token}"})  # fmt: skip
    body = json.loads(urllib.request.urlopen(request, timeout=30).read())
    return body["data"]["result"]["result"]


def psr_ray_submit(*args: str, env: dict[str, str], timeout: float = 900) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "psr-ray"), "submit", "--config", str(ROOT / "psr_ray/configs/embedded_cpu.yaml"),
                             *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip


# ---- the client's rules, without a cluster ---------------------------------------------------------------


def test_address_comes_from_the_flag_or_ray_address():
    assert submit.resolve_address("http://h:8265", environ={}) == "http://h:8265"
    assert submit.resolve_address(None, environ={"RAY_ADDRESS": "10.0.0.5:8265"}) == "http://10.0.0.5:8265"
    with pytest.raises(ValueError, match="pass --address"):
        submit.resolve_address(None, environ={})
    with pytest.raises(ValueError, match="not the dashboard's"):
        submit.resolve_address("ray://h:10001", environ={})


def test_token_is_found_in_rays_order(tmp_path):
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    (tmp_path / "tok").write_text("from-path\n")
    assert submit.find_token(environ={"HOME": str(tmp_path)}) == ("from-home", str(tmp_path / ".ray/auth_token"))
    path_env = {"HOME": str(tmp_path), "RAY_AUTH_TOKEN_PATH": str(tmp_path / "tok")}
    assert submit.find_token(environ=path_env)[0] == "from-path"
    assert submit.find_token(environ=path_env | {"RAY_AUTH_TOKEN": "from-env"})[0] == "from-env"
    assert submit.find_token(environ={"HOME": str(tmp_path / "nobody")}) == (None, "")
    with pytest.raises(ValueError, match="RAY_AUTH_TOKEN_PATH=/nope cannot be read"):
        submit.find_token(environ={"RAY_AUTH_TOKEN_PATH": "/nope"})


def test_a_token_bound_for_plain_http_elsewhere_is_warned_about():
    warnings: list[str] = []
    assert submit.auth_headers("http://127.0.0.1:8265", "t", warn=warnings.append) == {"Authorization": "Bearer t"}
    submit.auth_headers("https://head.example.com", "t", warn=warnings.append)
    submit.auth_headers("http://localhost:8265", "t", warn=warnings.append)
    assert warnings == []
    submit.auth_headers("http://10.0.0.5:8265", "t", warn=warnings.append)
    assert len(warnings) == 1 and "plain http to 10.0.0.5" in warnings[0]
    assert submit.auth_headers("http://10.0.0.5:8265", None, warn=warnings.append) == {}


def test_secrets_travel_from_the_shell_never_from_the_repo():
    env = submit.runtime_env(environ={"WANDB_API_KEY": "k", "HF_TOKEN": "", "HOME": "/x"})
    assert env["env_vars"]["WANDB_API_KEY"] == "k" and "HF_TOKEN" not in env["env_vars"]
    assert "WANDB_API_KEY" not in submit.runtime_env(environ={})["env_vars"]


def test_submit_leaves_cluster_paths_and_gpus_to_the_job():
    from psr_ray.app.cli import build_parser, load_config

    here = ["--config", str(ROOT / "jobs/configs/qwen2.5-math-7b.yaml"), "run.ray_address=null",
            "model.path=/models/only/on/the/cluster", "data.source=/data/only/on/the/cluster.jsonl"]  # fmt: skip
    load_config(build_parser().parse_args(["submit", *here]))  # no GPU here, paths only the cluster has: fine
    with pytest.raises(ValueError) as err:
        load_config(build_parser().parse_args(["validate", *here]))
    assert "ask(s) for GPUs" in str(err.value) and "model.path" in str(err.value)


# ---- a real head with token auth ------------------------------------------------------------------------


@pytest.mark.ray
def test_without_a_token_submit_stops_with_one_line(ray_head, tmp_path):
    ports, env = ray_head
    bare = {k: v for k, v in env.items() if not k.startswith("RAY_")} | {"HOME": str(tmp_path)}  # no ~/.ray either
    job = psr_ray_submit("--address", f"http://127.0.0.1:{ports['dashboard']}", env=bare)
    output = job.communicate(timeout=120)[0]
    assert job.returncode == 1
    (line,) = [line for line in output.splitlines() if line.strip()]
    assert line.startswith(f"psr-ray submit: the cluster at http://127.0.0.1:{ports['dashboard']} requires a Ray "
                           "auth token and none was found: set RAY_AUTH_TOKEN")  # fmt: skip


@pytest.mark.ray
def test_submit_shows_the_cluster_and_refuses_a_run_it_cannot_place(ray_head, tmp_path):
    """The cluster behind --address is shown before anything is submitted (a dashboard of a local CPU run is
    seen for what it is), and a run its nodes cannot place fails there, naming what is missing: no job."""
    ports, env = ray_head
    address = f"http://127.0.0.1:{ports['dashboard']}"
    job = psr_ray_submit(
        *PINNED, "rollout.num_engines=6", f"run.output_dir={tmp_path}", "--no-wait", env=env | {"RAY_ADDRESS": address}
    )
    output = job.communicate(timeout=120)[0]
    assert job.returncode == 1, output
    lines = [line for line in output.splitlines() if line.strip() and "warning: " not in line]
    assert lines[0] == f"[psr_ray] the cluster at {address}: 1 node: 6 CPU, 4 psr_engine, 2 psr_trainer", output
    assert lines[-1] == (
        "psr-ray submit: this run cannot be placed on the cluster (1 node: 6 CPU, 4 psr_engine, 2 psr_trainer): "
        "the run asks for 15 CPU in all, the cluster has 6; the run asks for 7 psr_engine in all, the cluster has 4; "
        "add nodes with those resources, lower the run's asks (num_engines, num_*_per_engine, trainer.num_workers), "
        "or set run.autoscaling=true if an autoscaler adds nodes"
    ), output
    assert len(lines) == 2 and "submitted job" not in output


@pytest.mark.ray
def test_the_job_refuses_a_multi_node_run_without_shared_storage(ray_head, tmp_path):
    ports, env = ray_head
    job = psr_ray_submit(*PINNED, f"run.output_dir={tmp_path / 'run'}", env=env | {
        "RAY_ADDRESS": f"http://127.0.0.1:{ports['dashboard']}"})  # fmt: skip
    logs = job.communicate(timeout=300)[0]
    assert job.returncode == 1, logs[-3000:]  # submitted (the laptop has no say on paths), FAILED on the cluster
    assert "submitted job" in logs and "FAILED" in logs
    assert f"run.output_dir='{tmp_path / 'run'}' is on a" in logs and "run.require_shared_storage=false" in logs
    assert "Traceback" not in logs


@pytest.mark.ray
def test_submit_tiny_run_pinned_to_node_groups_with_live_metrics(ray_head, tiny_model_dir, tmp_path):
    ports, env = ray_head
    out = tmp_path / "run"
    job = psr_ray_submit(f"model.path={tiny_model_dir}", *TINY_RUN, *PINNED, f"run.output_dir={out}",
                         "run.require_shared_storage=false",  # one node here: the test's tmp dir is its storage
                         env=env | {"RAY_ADDRESS": f"http://127.0.0.1:{ports['dashboard']}"})  # fmt: skip
    samples: list[tuple[float, list[str]]] = []
    deadline = time.monotonic() + 900
    while job.poll() is None and time.monotonic() < deadline:
        samples.append((time.monotonic(), scrape(ports["metrics"])))
        time.sleep(2)
    logs = job.communicate(timeout=60)[0]
    assert job.returncode == 0, logs[-4000:]
    assert "SUCCEEDED" in logs and (out / "results.json").is_file()

    lines = [line for _, sample in samples for line in sample]
    names = {line.split("{")[0] for line in lines}

    def seen(series: str, **tags: str) -> list[float]:
        want = [f'{key}="{value}"' for key, value in tags.items()]
        return [float(line.rsplit(" ", 1)[1]) for line in lines
                if line.startswith(series + "{") and all(t in line for t in want)]  # fmt: skip

    # Live train metrics from rank 0, scraped while the trainer workers ran (a gauge vanishes with its process).
    assert seen("ray_psr_train_loss", mode="dpo") and max(seen("ray_psr_train_steps_total", mode="dpo")) >= 1
    assert seen("ray_psr_weight_sync_seconds_total", backend="object_store")
    assert seen("ray_psr_iteration") and seen("ray_psr_policy_version")
    # Tokens per engine role: psr_ray's count and vLLM's own, each engine tagged with its role and name.
    for role in ("rollout", "judge"):
        assert max(seen("ray_psr_generated_tokens_total", role=role)) > 0
        assert max(seen("ray_vllm_generation_tokens_total", role=role, engine_name=f"psr-{role}-0")) > 0
    # Every vLLM series the Grafana dashboard plots is one the engines export (counters that stayed 0 aside).
    from psr_ray.runtime.grafana import ENGINE_PANELS

    plotted = {s.removesuffix("_bucket") for _, expr, _ in ENGINE_PANELS for s in re.findall(r"ray_vllm_\w+", expr)}
    exported = {n.removesuffix("_bucket") for n in names}
    assert plotted - exported <= {"ray_vllm_num_preemptions_total", "ray_vllm_prefix_cache_hits_total"}, sorted(
        exported
    )

    # The engines and trainer workers asked for their node groups' resources.
    every = actors(ports, env["RAY_AUTH_TOKEN"])
    engines = {a["name"]: a["required_resources"] for a in every if a.get("class_name") == "EngineActor"}
    assert engines["psr-rollout-0"]["psr_engine"] == engines["psr-judge-0"]["psr_engine"] == 1.0
    # Train workers run in Ray Train's placement group, so their request reads psr_trainer_group_<pg id>.
    workers = [a["required_resources"] for a in every if a.get("class_name") == "RayTrainWorker"]
    assert len(workers) == 2
    assert all([v for k, v in r.items() if k.startswith("psr_trainer_group_") and k.count("_") == 3] == [1.0]
               for r in workers), workers  # fmt: skip

    # The console in the job's logs: a line per stage, a summary per iteration, no worker chatter.
    assert "[psr_ray] engine, trainer and Ray Data logs:" in logs
    for stage in ("starting model: eval:", "iter 1/1 search+train:", "iter 1/1 sync:", "iter 1/1 eval:"):
        assert stage in logs, stage
    assert "== starting model: gsm8k" in logs and "== iteration 1/1: " in logs and "policy v2" in logs
    for noise in ("Reporting training result", "(EngineActor", "(RayTrainWorker", "Running Dataset"):
        assert noise not in logs, noise
    assert "Results" in logs and "gsm8k" in logs  # the driver's results table came back in the logs
