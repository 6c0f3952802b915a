"""Session fixtures: one tiny model, one local Ray cluster, the embedded SmolLM2 (slow, built on demand)."""

from __future__ import annotations

import os

import pytest

# Two cores: keep every process (driver, Ray workers, engines) to one thread so they don't oversubscribe.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# The files that take longest (minutes each, from `make test`'s --durations), longest first. `make test` runs files
# on two workers in the order collected: these go first, the unit files last, so that no worker ends alone on one.
LONGEST_FILES = (
    "tests/test_driver_kills.py",
    "tests/multinode/test_engine_node.py",
    "tests/multinode/test_node_loss.py",
    "tests/init_data/test_init_data.py",
    "tests/test_gpu_check.py",
    "tests/test_loop.py",
    "tests/test_gpu_placement.py",
    "tests/test_submit.py",
    "tests/test_faults.py",
)


def _longest_first(items) -> None:
    """Sorts the items by file: LONGEST_FILES, then files with a ray or slow test, then the rest; a file's tests
    stay together and in their order."""

    def path(item) -> str:
        return item.nodeid.partition("::")[0]

    heavy = {path(item) for item in items if {"ray", "slow"} & set(item.keywords)}

    def key(item) -> tuple[int, int]:
        file = path(item)
        if file in LONGEST_FILES:
            return 0, LONGEST_FILES.index(file)
        return (1, 0) if file in heavy else (2, 0)

    items.sort(key=key)  # stable


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects: the ray marks added here count
def pytest_collection_modifyitems(config, items):
    # The tiers: `pytest -m "not ray and not slow"` is the unit tier. A test that uses the local Ray cluster,
    # directly or through another fixture, is a `ray` test whatever its module says.
    for item in items:
        if "ray_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)
    _longest_first(items)
    if any("gpu" in item.keywords for item in items) and not _cuda_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    from psr_ray.testing import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp("tiny_model")))


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    if not ray.is_initialized():
        # address="local": a new cluster for the suite, never one a `ray start` or another session left here.
        ray.init(address="local", num_cpus=4, include_dashboard=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def embedded_model_dir() -> str:
    from psr_ray.runtime.models import resolve_model_path

    return resolve_model_path("embedded:smollm2-135m-instruct", os.path.expanduser("~/.cache/psr_ray"))


def _forbid_tensor_loads(monkeypatch) -> None:
    """Any load of tensors from a file, or the probe's reference forward, in this (the driver's) process
    fails the test; Ray workers and engines are other processes with their own modules."""
    import safetensors
    import safetensors.torch
    import torch

    from psr_ray.runtime import models
    from psr_ray.weight_sync import base, probe

    def forbidden(*args, **kwargs):
        raise AssertionError("the driver loaded tensors of the export")

    for module, name in ((safetensors, "safe_open"), (safetensors.torch, "load_file"), (safetensors.torch, "load"),
                         (torch, "load"), (models, "load_safetensors_dir"), (probe, "reference_logprobs"),
                         (probe, "_model_with"), (base, "reference_logprobs")):  # fmt: skip
        monkeypatch.setattr(module, name, forbidden)


@pytest.fixture
def forbid_tensor_loads():
    """`forbid_tensor_loads(monkeypatch)`: from then on (until `monkeypatch.undo()`) the driver may read no
    tensor (the export is read where it is used: weight_sync/export.py)."""
    return _forbid_tensor_loads
