"""Where a run's pieces go on a cluster: the node-group resources engines and trainer workers ask for, the
shared-storage checks of a multi-node run, and `run.resume: auto`. (tests/test_submit.py sees the requests
made by real engines and trainer workers on a real head.)"""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from psr_ray import config as C
from psr_ray.config.storage import filesystem_of, storage_errors
from psr_ray.engines.pool import node_group_request
from psr_ray.pipeline import preflight
from psr_ray.trainer.group import scaling_kwargs


def mounts(tmp_path) -> str:
    """A /proc/mounts of this machine's root plus an NFS mount (EFS) and a local disk under tmp_path."""
    for name in ("shared", "local"):
        (tmp_path / name).mkdir()
    return (
        f"overlay / overlay rw,relatime 0 0\n/dev/nvme0n1p1 {tmp_path}/local ext4 rw 0 0\n"
        f"fs-0123.efs.us-west-2.amazonaws.com:/ {tmp_path}/shared nfs4 rw,vers=4.1 0 0\n"
    )


def test_engines_ask_for_one_node_group_unit_per_gpu():
    pool = C.RolloutConfig()
    assert node_group_request(pool) == {}  # not pinned: free placement (the embedded run)
    assert node_group_request(dataclasses.replace(pool, node_resource="psr_engine")) == {"psr_engine": 1.0}
    gpu = dataclasses.replace(pool, node_resource="psr_engine", num_gpus_per_engine=0.5)
    assert node_group_request(gpu) == {"psr_engine": 0.5}  # two engines share a GPU and a unit
    tp = dataclasses.replace(pool, node_resource="psr_engine", num_gpus_per_engine=4, tensor_parallel_size=4)
    assert node_group_request(tp, shard=True) == {"psr_engine": 1.0}  # one per tensor-parallel bundle


def test_trainer_workers_ask_for_the_trainer_group():
    tcfg = C.TrainerConfig(num_workers=8, use_gpu=True, num_cpus_per_worker=8)
    assert scaling_kwargs(tcfg) == {"num_workers": 8, "use_gpu": True, "resources_per_worker": {"CPU": 8}}
    pinned = scaling_kwargs(dataclasses.replace(tcfg, node_resource="psr_trainer"))
    assert pinned["resources_per_worker"] == {"CPU": 8, "psr_trainer": 1.0}


def test_filesystem_of_finds_the_mount_of_a_path_not_created_yet(tmp_path):
    table = mounts(tmp_path)
    assert filesystem_of(tmp_path / "shared" / "psr" / "run1", table) == (f"{tmp_path}/shared", "nfs4")
    assert filesystem_of(tmp_path / "local" / "runs", table) == (f"{tmp_path}/local", "ext4")


def _multi_node(*overrides: str) -> C.PSRConfig:
    return C.load([], ["rollout.node_resource=psr_engine", "judge.node_resource=psr_engine",
                       "trainer.node_resource=psr_trainer", *overrides])  # fmt: skip


def test_a_multi_node_run_needs_an_absolute_output_dir_unless_opted_out():
    (error,) = storage_errors(_multi_node("run.output_dir=runs/x"), check_paths=False)
    assert error.startswith("run.output_dir='runs/x' is relative") and "run.require_shared_storage=false" in error
    assert (
        storage_errors(_multi_node("run.output_dir=runs/x", "run.require_shared_storage=false"), check_paths=True) == []
    )
    assert storage_errors(C.load([], ["run.output_dir=runs/x"]), check_paths=True) == []  # one machine: fine


def test_the_job_refuses_an_output_dir_on_node_local_disk(tmp_path, monkeypatch):
    table = mounts(tmp_path)
    local = _multi_node(f"run.output_dir={tmp_path}/local/runs/x")
    shared = _multi_node(f"run.output_dir={tmp_path}/shared/psr/x")
    assert storage_errors(local, check_paths=True, mounts_text=table) == []  # a laptop cannot see the cluster's mounts
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # what Ray's job supervisor sets in a job's driver
    (error,) = storage_errors(local, check_paths=True, mounts_text=table)
    assert f"run.output_dir='{tmp_path}/local/runs/x' is on a ext4 filesystem local to this node" in error
    assert "run.require_shared_storage=false" in error
    assert storage_errors(shared, check_paths=True, mounts_text=table) == []


def test_node_resources_must_be_custom_and_resume_never_or_auto():
    cfg = C.load([], ["trainer.node_resource=GPU", "run.resume=always"])
    with pytest.raises(ValueError) as err:
        preflight.validate(cfg, gpu_available=False, check_paths=False)
    assert "trainer.node_resource='GPU' must name a custom resource" in str(err.value)
    assert "run.resume must be never or auto, got 'always'" in str(err.value)


def test_resume_auto_continues_the_run_in_output_dir(tmp_path, monkeypatch):
    from psr_ray.app import commands
    from psr_ray.pipeline import loop
    from psr_ray.pipeline.run_state import RunState

    seen = []
    monkeypatch.setattr(loop, "run", lambda cfg, resume_dir: seen.append(resume_dir))
    out = tmp_path / "run"
    args = argparse.Namespace(resume=None)
    commands.run(C.load([], [f"run.output_dir={out}", "run.resume=auto"]), args)  # nothing there yet: a new run
    RunState(out).set_config({})
    commands.run(C.load([], [f"run.output_dir={out}", "run.resume=auto"]), args)  # a resubmitted job
    commands.run(C.load([], [f"run.output_dir={out}"]), args)  # never: the loop refuses the folder itself
    assert seen == [None, str(out), None]
