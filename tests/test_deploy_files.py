"""Every file users deploy with: cluster/ and jobs/ YAML, the Grafana dashboard, the Dockerfile."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def load(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def test_every_yaml_parses():
    files = sorted(ROOT.glob("cluster/*.yaml")) + sorted(ROOT.glob("jobs/**/*.yaml"))
    assert len(files) >= 5
    for path in files:
        assert isinstance(yaml.safe_load(path.read_text()), dict), path


def test_cluster_launcher_has_what_ray_up_requires():
    cfg = load("cluster/aws.yaml")
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "max_workers"):
        assert key in cfg, key
    assert cfg["provider"]["type"] and cfg["provider"]["region"]
    assert cfg["head_node_type"] in cfg["available_node_types"]
    workers = {k: v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]}
    # Engines and trainers scale separately.
    assert {"engine_gpu", "trainer_gpu"} <= set(workers)
    for node in cfg["available_node_types"].values():
        assert "node_config" in node and "resources" in node
    for node in workers.values():
        assert node["min_workers"] <= node["max_workers"]


def _check_worker_groups(groups: list[dict]) -> None:
    assert {g["groupName"] for g in groups} >= {"engines", "trainers"}
    for group in groups:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert "rayStartParams" in group
        (container,) = group["template"]["spec"]["containers"]
        assert container["image"] and container["resources"]["limits"]["nvidia.com/gpu"]


def test_kuberay_raycluster():
    doc = load("cluster/kuberay-raycluster.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    spec = doc["spec"]
    assert spec["rayVersion"] == "2.60.0"
    assert spec["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    assert "rayStartParams" in spec["headGroupSpec"]
    _check_worker_groups(spec["workerGroupSpecs"])


def test_kuberay_rayjob_runs_the_job_entrypoint():
    doc = load("cluster/kuberay-rayjob.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    assert spec["entrypoint"].startswith("python -m psr_ray --config jobs/configs/")
    config = spec["entrypoint"].split("--config ")[1].split()[0]
    assert (ROOT / config).is_file()
    assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)
    _check_worker_groups(spec["rayClusterSpec"]["workerGroupSpecs"])


def test_runtime_env_uploads_the_repo_without_the_venv():
    env = load("jobs/runtime_env.yaml")
    assert env["working_dir"] == "."
    assert ".venv" in env["excludes"]
    assert all(isinstance(v, str) for v in env["env_vars"].values())


def test_grafana_dashboard_is_generated_from_the_instruments():
    from psr_ray.metrics import INSTRUMENTS, grafana_dashboard

    committed = json.loads((ROOT / "cluster" / "grafana_dashboard.json").read_text())
    assert committed == grafana_dashboard(), "regenerate: python -m psr_ray.metrics > cluster/grafana_dashboard.json"
    exprs = " ".join(p["targets"][0]["expr"] for p in committed["panels"])
    for name in INSTRUMENTS:
        assert f"ray_psr_{name}" in exprs


def test_dockerfile_pins_and_lints():
    text = (ROOT / "docker" / "Dockerfile").read_text()
    assert "FROM rayproject/ray:2.60.0-py312" in text
    for pin in ("VLLM_VERSION=0.32.0", "TORCH_VERSION=2.13.0", "DEEPSPEED_VERSION=0.19.8"):
        assert pin in text
    hadolint = shutil.which("hadolint") or str(Path(__import__("sys").executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint not installed (it comes with the dev extras)")
    result = subprocess.run([hadolint, str(ROOT / "docker" / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_job_entrypoint_is_relative_to_the_uploaded_repo(tmp_path):
    from psr_ray.submit import job_entrypoint

    line = job_entrypoint([str(ROOT / "psr_ray/configs/embedded_cpu.yaml")], ["run.num_iterations=1"])
    assert line == "python -m psr_ray --config psr_ray/configs/embedded_cpu.yaml run.num_iterations=1"
    outside = tmp_path / "x.yaml"
    outside.write_text("{}")
    with pytest.raises(ValueError, match="working_dir"):
        job_entrypoint([str(outside)], [])
