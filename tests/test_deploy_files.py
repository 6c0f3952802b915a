"""Every file users deploy with: cluster/ files (launcher schema, shared storage, node groups, auth, metrics),
jobs/ YAML, the Grafana dashboard, the Dockerfile, and the packaging they rely on (pyproject extras, Makefile)."""

from __future__ import annotations

import ast
import copy
import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
RECIPE = "jobs/configs/qwen2.5-math-7b.yaml"
PLACEHOLDER = re.compile(r"\$\{([A-Z][A-Z0-9_]*)\}")
KUBERAY = ("cluster/kuberay-raycluster.yaml", "cluster/kuberay-rayjob.yaml")
STORAGE = "/mnt/cluster_storage"


def load(name: str) -> dict:
    """A deployment YAML with its ${NAME} placeholders filled as envsubst would (README "On a cluster")."""
    text = PLACEHOLDER.sub(lambda m: f"x-{m.group(1).lower()}", (ROOT / name).read_text())
    return yaml.safe_load(text)


def recipe():
    from psr_ray.config import load as load_config

    return load_config([str(ROOT / RECIPE)])


def cluster_spec(name: str) -> dict:
    doc = load(name)
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def pod_specs(name: str) -> list[dict]:
    spec = cluster_spec(name)
    return [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]


def kuberay_resources(group: dict) -> dict[str, float]:
    raw = group["rayStartParams"].get("resources")
    return json.loads(raw.strip('"').replace('\\"', '"')) if raw else {}


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def test_every_yaml_parses():
    files = sorted(ROOT.glob("cluster/*.yaml")) + sorted(ROOT.glob("jobs/**/*.yaml"))
    assert len(files) >= 7
    for path in files:
        assert isinstance(load(str(path.relative_to(ROOT))), dict), path


def test_every_placeholder_is_explained_in_the_cluster_how_to():
    how_to = readme_section("On a cluster")
    names = {m for path in ROOT.glob("cluster/*.yaml") for m in PLACEHOLDER.findall(path.read_text())}
    assert {"REGISTRY", "STORAGE_CLASS", "EFS_ID", "AMI_ID"} <= names
    assert not [n for n in sorted(names) if f"{n}=" not in how_to], "export every placeholder in the README how-to"


def test_cluster_launcher_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = load("cluster/aws.yaml")
    validate_config(prepare_config(copy.deepcopy(cfg)))  # what `ray up` checks before launching anything
    head = cfg["head_node_type"]
    assert cfg["available_node_types"][head]["resources"] == {"CPU": 0}
    workers = {k: v for k, v in cfg["available_node_types"].items() if k != head}
    assert {"engine_gpu", "trainer_gpu"} <= set(workers)
    for node in cfg["available_node_types"].values():
        # The launcher's default AMI carries a CUDA 11 driver: every node names its own.
        assert node["node_config"]["ImageId"] not in ("", "latest_dlami")
    for node in workers.values():
        assert node["min_workers"] <= node["max_workers"]
        config = node["node_config"]
        # The recipe is sized for 8 x 80 GB GPUs; EFA carries NCCL between nodes.
        assert config["InstanceType"] in ("p4de.24xlarge", "p5.48xlarge", "p5e.48xlarge", "p5en.48xlarge")
        assert [ni["InterfaceType"] for ni in config["NetworkInterfaces"]].count("efa") >= 1
    assert "--device=/dev/infiniband" in cfg["docker"]["worker_run_options"]
    assert cfg["provider"]["use_internal_ips"] is True  # multi-interface nodes get no public IP


def test_every_cluster_file_mounts_the_recipes_output_dir_from_shared_storage():
    assert recipe().run.output_dir.startswith(f"{STORAGE}/")
    aws = load("cluster/aws.yaml")
    assert f"-v {STORAGE}:{STORAGE}" in aws["docker"]["run_options"]
    assert any("mount -t nfs4" in c and f":/ {STORAGE}" in c for c in aws["initialization_commands"])
    claim = load("cluster/kuberay-storage.yaml")
    assert claim["kind"] == "PersistentVolumeClaim" and claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for name in KUBERAY:
        for pod in pod_specs(name):
            volumes = {v["name"]: v for v in pod["volumes"]}
            (container,) = pod["containers"]
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert volumes[mounts[STORAGE]]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"], name


def test_node_groups_declare_what_the_recipe_asks_for():
    from psr_ray.engines.pool import node_group_request
    from psr_ray.trainer.group import scaling_kwargs

    cfg = recipe()
    engine_units = sum(section.num_engines * node_group_request(section)[section.node_resource]
                       for section in (cfg.rollout, cfg.judge) if section.num_engines)  # fmt: skip
    trainer = scaling_kwargs(cfg.trainer)
    trainer_units = trainer["num_workers"] * trainer["resources_per_worker"][cfg.trainer.node_resource]
    assert cfg.rollout.node_resource == "psr_engine" and cfg.judge.num_engines == 0  # one pool serves both roles
    assert cfg.trainer.node_resource == "psr_trainer"
    aws = load("cluster/aws.yaml")["available_node_types"]
    groups = {"engines": (aws["engine_gpu"]["resources"], aws["engine_gpu"]["max_workers"]),
              "trainers": (aws["trainer_gpu"]["resources"], aws["trainer_gpu"]["max_workers"])}  # fmt: skip
    checks = [groups]
    for name in KUBERAY:
        spec = cluster_spec(name)
        assert not kuberay_resources(spec["headGroupSpec"])
        checks.append({g["groupName"]: (kuberay_resources(g), g["maxReplicas"]) for g in spec["workerGroupSpecs"]})
    for by_group in checks:
        (engine_res, engine_max), (trainer_res, trainer_max) = by_group["engines"], by_group["trainers"]
        assert set(engine_res) == {"psr_engine"} and set(trainer_res) == {"psr_trainer"}
        assert engine_units <= engine_res["psr_engine"] * engine_max
        assert trainer_units <= trainer_res["psr_trainer"] * trainer_max


def test_auth_is_on_wherever_ray_listens():
    aws = load("cluster/aws.yaml")
    assert "--env RAY_AUTH_MODE=token" in aws["docker"]["run_options"]
    assert "~/.ray/auth_token" in aws["file_mounts"]
    assert not any("dashboard-host" in c for c in aws["head_start_ray_commands"])  # loopback, Ray's default
    for name in KUBERAY:
        spec = cluster_spec(name)
        assert spec["authOptions"]["mode"] == "token", name
        assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"  # the Service; token-guarded


def test_secrets_reach_the_driver_from_kubernetes_secrets_only():
    for name in KUBERAY:
        (head,) = cluster_spec(name)["headGroupSpec"]["template"]["spec"]["containers"]
        env = {e["name"]: e for e in head["env"]}
        assert env["WANDB_API_KEY"]["valueFrom"]["secretKeyRef"]["optional"] is True
        assert "value" not in env["WANDB_API_KEY"]
    assert "WANDB_API_KEY" not in (ROOT / "jobs" / "runtime_env.yaml").read_text().split("Secrets never")[0]


def test_rayjob_run_outlives_its_cluster():
    spec = load("cluster/kuberay-rayjob.yaml")["spec"]
    assert spec["entrypoint"] == f"python -m psr_ray --config {RECIPE}"
    assert spec["backoffLimit"] >= 1 and recipe().run.resume == "auto"  # a retry continues the run
    assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)
    for name in KUBERAY:
        spec = cluster_spec(name)
        assert spec["rayVersion"] == importlib.metadata.version("ray")
        for group in spec["workerGroupSpecs"]:
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
            (container,) = group["template"]["spec"]["containers"]
            assert container["resources"]["limits"]["nvidia.com/gpu"]


def test_every_ray_container_exposes_its_metrics_to_the_pod_monitor():
    monitor = load("cluster/kuberay-podmonitor.yaml")
    assert monitor["kind"] == "PodMonitor" and monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    for name in KUBERAY:
        spec = cluster_spec(name)
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            assert group["rayStartParams"]["metrics-export-port"] == "8080"
            (container,) = group["template"]["spec"]["containers"]
            assert {"containerPort": 8080, "name": "metrics"} in container["ports"]


def test_runtime_env_uploads_the_repo_without_the_venv():
    env = load("jobs/runtime_env.yaml")
    assert env["working_dir"] == "."
    assert ".venv" in env["excludes"]
    assert all(isinstance(v, str) for v in env["env_vars"].values())


def test_grafana_dashboard_is_generated_and_plots_every_instrument():
    from psr_ray.runtime.grafana import ENGINE_PANELS, grafana_dashboard
    from psr_ray.runtime.metrics import INSTRUMENTS

    committed = json.loads((ROOT / "cluster" / "grafana_dashboard.json").read_text())
    assert committed == grafana_dashboard(), (
        "regenerate: python -m psr_ray.runtime.grafana > cluster/grafana_dashboard.json"
    )
    exprs = " ".join(t["expr"] for p in committed["panels"] for t in p["targets"])
    for name in INSTRUMENTS:
        assert f"ray_psr_{name}" in exprs
    for series in ("kv_cache_usage_perc", "num_requests_waiting", "time_to_first_token_seconds", "generation_tokens"):
        assert f"ray_vllm_{series}" in exprs
    assert all("role" in expr for _, expr, _ in ENGINE_PANELS)


def test_dockerfile_base_matches_the_wheels_cuda_and_installs_the_recipes_needs():
    text = (ROOT / "docker" / "Dockerfile").read_text()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    ray_pin = next(d for d in pyproject["project"]["dependencies"] if d.startswith("ray["))
    assert f"FROM rayproject/ray:{ray_pin.split('==')[1]}-py312-cu130" in text  # PyPI's torch/vLLM: CUDA 13.0
    assert f"VLLM_VERSION={pyproject['project']['optional-dependencies']['gpu'][0].split('==')[1]}" in text
    for pin in ("TORCH_VERSION=2.13.0", "DEEPSPEED_VERSION=0.19.8"):
        assert pin in text
    assert '".[gpu,data,embedded]"' in text and "--no-deps -r requirements/embedded-nodeps.txt" in text
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint not installed (it comes with the dev extras)")
    result = subprocess.run([hadolint, str(ROOT / "docker" / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _third_party_imports() -> set[str]:
    names = set()
    for path in (ROOT / "psr_ray").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in ("psr_ray", "__future__")}


def test_every_package_psr_ray_imports_is_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    declared = {re.split(r"[\[<>=!~; ]", r)[0].lower().replace("_", "-") for r in requirements}
    nodeps = [line.split("==") for line in (ROOT / "requirements" / "embedded-nodeps.txt").read_text().splitlines()
              if line and not line.startswith("#")]  # fmt: skip
    declared |= {name for name, _ in nodeps}
    provided = importlib.metadata.packages_distributions()
    missing = {}
    for module in _third_party_imports():
        dists = {d.lower().replace("_", "-") for d in provided.get(module, [module])}
        if not dists & declared:
            missing[module] = sorted(dists)
    assert not missing, f"imported but declared nowhere in pyproject.toml: {missing}"
    for name, version in nodeps:  # the no-deps packages are the versions the set-up installs
        assert importlib.metadata.version(name) == version
    for path in ("Makefile", "docker/Dockerfile"):
        assert "--no-deps -r requirements/embedded-nodeps.txt" in (ROOT / path).read_text(), path
    assert project["optional-dependencies"]["data"] == ["datasets>=3"]


def test_job_entrypoint_is_relative_to_the_uploaded_repo(tmp_path):
    from psr_ray.runtime.submit import job_entrypoint

    line = job_entrypoint([str(ROOT / "psr_ray/configs/embedded_cpu.yaml")], ["run.num_iterations=1"])
    assert line == "python -m psr_ray --config psr_ray/configs/embedded_cpu.yaml run.num_iterations=1"
    outside = tmp_path / "x.yaml"
    outside.write_text("{}")
    with pytest.raises(ValueError, match="working_dir"):
        job_entrypoint([str(outside)], [])
