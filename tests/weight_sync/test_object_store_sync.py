"""A whole sync into two real engines (rollout and judge, tiny model, real local Ray) over the object store:
verified and committed; and every way it can fail leaves both engines serving their old weights at their old
version, with the real error naming the engine. Generation is refused while an update is under way."""

from __future__ import annotations

import pytest
import torch

from psr_ray.engines.api import ProposeRequest
from psr_ray.weight_sync.object_store import ObjectStoreSender, pack_bucket, unpack_bucket
from psr_ray.weight_sync.probe import ProbeSpec, make_probe, probe_error, reference_logprobs

pytestmark = pytest.mark.ray

BASE_VERSION = 1


@pytest.fixture(scope="module")
def setup(ray_cluster, tiny_model_dir):
    from transformers import AutoTokenizer

    from psr_ray import config as C
    from psr_ray.engines.actor import EngineActor
    from psr_ray.engines.settings import engine_settings
    from psr_ray.runtime.models import load_safetensors_dir

    cfg = C.load([], [f"model.path={tiny_model_dir}", "model.max_model_len=512"])
    engines = [
        ray_cluster.remote(EngineActor).options(num_cpus=0, name=f"sync-{role}").remote(
            engine_settings(cfg, role, tiny_model_dir), name=f"sync-{role}", policy_version=BASE_VERSION)
        for role in ("rollout", "judge")
    ]  # fmt: skip
    ray_cluster.get([e.ready.remote() for e in engines])
    base = load_safetensors_dir(tiny_model_dir)
    probe = make_probe(AutoTokenizer.from_pretrained(tiny_model_dir), tiny_model_dir)
    yield engines, base, probe, tiny_model_dir
    for e in engines:
        ray_cluster.kill(e)


def perturbed(base: dict, seed: int, scale: float = 0.05) -> dict:
    noise = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=noise) for k, v in base.items()}


def answers(ray, engines, probe: ProbeSpec) -> list[dict]:
    return ray.get([e.probe.remote(list(probe.token_ids), probe.num_top) for e in engines])


def assert_serving(ray, engines, state_dict: dict, probe: ProbeSpec, version: int) -> None:
    """Every engine serves `state_dict` (log-probs within 1e-4 of HF's) at `version`, and generates."""
    reference = reference_logprobs(state_dict, probe)
    for answer in answers(ray, engines, probe):
        assert probe_error(reference, answer) < 1e-4
    assert ray.get([e.policy_version.remote() for e in engines]) == [version, version]
    assert ray.get([e.update_state.remote() for e in engines]) == ["serving", "serving"]
    assert ray.get(engines[0].generate.remote(["Step 1:"], max_tokens=4))[0].policy_version == version


def sender(engines, probe, restore_dir, **kwargs):
    return ObjectStoreSender(engines, probe=probe, restore_dir=restore_dir, timeout_s=120, **kwargs)


def test_pack_bucket_is_zero_copy_and_exact():
    state = {"a": torch.randn(3, 4), "b": torch.randn(5).to(torch.bfloat16)}
    bucket = pack_bucket(state, ["b", "a"])
    assert bucket.arrays[1].ctypes.data == state["a"].data_ptr()  # a view, not a copy
    (b, tb), (a, ta) = unpack_bucket(bucket)
    assert (a, b) == ("a", "b") and torch.equal(ta, state["a"]) and torch.equal(tb, state["b"])
    assert tb.dtype == torch.bfloat16 and ta.data_ptr() == state["a"].data_ptr()


def test_sync_in_buckets_is_verified_and_committed(ray_cluster, setup):
    engines, base, probe, model_dir = setup
    new = perturbed(base, seed=1)
    report = sender(engines, probe, model_dir, bucket_mb=1).send(new, policy_version=2)
    assert report.ok, report.error
    assert report.num_engines == 2 and report.num_tensors == len(base) and report.num_bytes > 2e6
    assert set(report.probe_errors) == {"sync-rollout", "sync-judge"}
    assert max(report.probe_errors.values()) < 1e-4 and report.tolerance == 1e-3
    assert_serving(ray_cluster, engines, new, probe, 2)
    back = sender(engines, probe, model_dir).send(base, policy_version=3)  # one bucket
    assert back.ok, back.error
    assert_serving(ray_cluster, engines, base, probe, 3)


def test_a_transport_failure_midway_restores_the_old_weights(ray_cluster, setup):
    engines, base, probe, model_dir = setup
    version = ray_cluster.get(engines[0].policy_version.remote())
    broken = dict(perturbed(base, seed=2))
    last = list(broken)[-1]
    broken[last] = torch.empty(broken[last].shape, device="meta")  # fails when its bucket is packed
    report = sender(engines, probe, model_dir, bucket_mb=1).send(broken, policy_version=version + 1)
    assert not report.ok and "meta" in report.error
    assert "Every engine rolled back" in report.error
    assert_serving(ray_cluster, engines, base, probe, version)


def test_an_engine_failing_mid_load_rolls_itself_back(ray_cluster, setup):
    engines, base, probe, model_dir = setup
    version = ray_cluster.get(engines[1].policy_version.remote())
    items = list(perturbed(base, seed=3).items())
    name, tensor = items[len(items) // 2]
    items[len(items) // 2] = (name, torch.empty(tensor.shape, device="meta"))  # vLLM raises copying it
    with pytest.raises(ray_cluster.exceptions.RayTaskError) as failed:
        ray_cluster.get(engines[1].update_weights.remote(items, policy_version=version + 1, restore_dir=model_dir))
    message = str(failed.value)
    assert f"engine sync-judge: update to policy {version + 1} failed" in message
    assert "Cannot copy out of meta tensor" in message and f"rolled back to policy {version}" in message
    assert_serving(ray_cluster, engines, base, probe, version)


def test_weights_that_do_not_match_the_trainer_are_refused_and_rolled_back(ray_cluster, setup):
    engines, base, probe, model_dir = setup
    version = ray_cluster.get(engines[0].policy_version.remote())
    poisoned = perturbed(base, seed=4)
    poisoned["model.norm.weight"] = torch.full_like(poisoned["model.norm.weight"], float("nan"))
    sync = sender(engines, probe, model_dir)
    # The engines load what they are sent; the trainer's reference is computed from other weights.
    sync._transfer = lambda state_dict, plan: ObjectStoreSender._transfer(sync, poisoned, plan)
    report = sync.send(perturbed(base, seed=4), policy_version=version + 1)
    assert not report.ok
    for name in ("sync-rollout", "sync-judge"):
        assert f"engine {name} does not serve the trainer's weights" in report.error
    assert report.probe_errors["sync-rollout"] == float("inf")
    assert_serving(ray_cluster, engines, base, probe, version)


def test_a_plan_the_engine_cannot_take_touches_nothing(ray_cluster, setup):
    engines, base, probe, model_dir = setup
    version = ray_cluster.get(engines[0].policy_version.remote())
    wrong = dict(base) | {"model.norm.weight": torch.ones(7), "model.layers.9.mlp.up_proj.weight": torch.ones(2)}
    report = sender(engines, probe, model_dir).send(wrong, policy_version=version + 1)
    assert not report.ok
    assert f"engine sync-rollout: update to policy {version + 1} refused, weights unchanged" in report.error
    assert "model.norm.weight: shape [7], expected [128]" in report.error
    assert "model.layers.9.mlp.up_proj.weight: not a weight of this model" in report.error
    assert_serving(ray_cluster, engines, base, probe, version)


def test_no_generation_while_an_update_is_under_way(ray_cluster, setup):
    engines, base, probe, model_dir = setup
    rollout = engines[0]
    version = ray_cluster.get(rollout.policy_version.remote())
    plan = [(n, tuple(t.shape), "float32") for n, t in base.items()]
    ray_cluster.get(rollout.begin_update.remote(plan, policy_version=version + 1, restore_dir=model_dir))
    request = ProposeRequest("What is 2 + 2?", "", 1)
    calls = [rollout.propose.remote([request], num_candidates=2, temperature=1.0, top_p=1.0, max_tokens=4),
             rollout.generate.remote(["Step 1:"], max_tokens=4)]  # fmt: skip
    for call in calls:
        with pytest.raises(ray_cluster.exceptions.RayTaskError, match=r"engine sync-rollout is loading weights"):
            ray_cluster.get(call)
    ray_cluster.get(rollout.load_bucket.remote(list(perturbed(base, seed=5).items())))
    ray_cluster.get(rollout.end_update.remote())
    with pytest.raises(ray_cluster.exceptions.RayTaskError, match="is loaded weights"):
        ray_cluster.get(rollout.generate.remote(["Step 1:"], max_tokens=4))
    assert ray_cluster.get(rollout.rollback_update.remote()) == version  # not verified: back to the old ones
    assert_serving(ray_cluster, engines, base, probe, version)


def export_of(state_dict: dict, model_dir: str, folder) -> str:
    """An HF folder holding `state_dict` with `model_dir`'s config and tokenizer (a trainer's export)."""
    import shutil
    from pathlib import Path

    from safetensors.torch import save_file

    for f in Path(model_dir).iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, folder / f.name)
    save_file(state_dict, str(folder / "model.safetensors"))
    return str(folder)


def test_the_sync_stage_reloads_what_the_push_missed_from_the_export(
    ray_cluster, setup, tmp_path, monkeypatch, forbid_tensor_loads
):
    from psr_ray.pipeline.sync_stage import sync_stage
    from psr_ray.weight_sync.base import SyncError, SyncReport

    engines, base, probe, model_dir = setup
    version = ray_cluster.get(engines[0].policy_version.remote())
    ray_cluster.get([e.update_weights_from_path.remote(model_dir, policy_version=version) for e in engines])
    failed_push = SyncReport("object_store", version + 1, 2, len(base), 1, 0.5, error="SyncError: boom").to_dict()

    new = perturbed(base, seed=6)
    (tmp_path / "good").mkdir()
    good = export_of(new, model_dir, tmp_path / "good")
    with monkeypatch.context() as patch:  # no reference recorded here: a Ray task computes it, not the driver
        forbid_tensor_loads(patch)
        summary = sync_stage(engines, pushed=failed_push, policy_dir=good, policy_version=version + 1,
                             probe=probe, timeout_s=120)  # fmt: skip
    assert summary["transport"] == "export" and summary["reloaded_from_export"] == 2
    assert summary["push_error"] == "SyncError: boom" and summary["max_probe_error"] < 1e-4
    assert summary["num_bytes"] == sum(t.numel() * 4 for t in base.values()) and summary["seconds"] > 0.5
    assert_serving(ray_cluster, engines, new, probe, version + 1)

    # The push reached every engine: nothing to reload, the push's figures are the stage's.
    pushed = SyncReport("object_store", version + 1, 2, len(base), 10**6, 0.25, 0.1, {"a": 1e-5}, 1e-3).to_dict()
    summary = sync_stage(engines, pushed=pushed, policy_dir=good, policy_version=version + 1, probe=probe,
                         timeout_s=120)  # fmt: skip
    assert summary["reloaded_from_export"] == 0 and summary["transport"] == "object_store"
    assert summary["gbytes_per_s"] == pytest.approx(10**6 / 1e9 / 0.25)

    # A broken export after a failed push: both errors, and the engines keep serving the last good policy.
    broken = perturbed(base, seed=7) | {"model.norm.weight": torch.full((128,), float("nan"))}
    (tmp_path / "broken").mkdir()
    bad = export_of(broken, model_dir, tmp_path / "broken")
    with pytest.raises(SyncError, match=r"the trainer's push failed: SyncError: boom; then reloading 2 engine\(s\)"):
        sync_stage(engines, pushed=failed_push | {"policy_version": version + 2}, policy_dir=bad,
                   policy_version=version + 2, probe=probe, timeout_s=120)  # fmt: skip
    assert_serving(ray_cluster, engines, new, probe, version + 1)


def test_the_export_reload_reads_no_tensor_in_the_driver(
    ray_cluster, setup, tmp_path, monkeypatch, forbid_tensor_loads
):
    """The engines read the export, the plan comes from its headers and the probe's reference from what the
    trainer recorded beside it: with every tensor load forbidden in the driver, the reload is verified; a
    recorded reference of other weights fails it, the engines back on their old policy."""
    from psr_ray.pipeline.sync_stage import sync_stage
    from psr_ray.weight_sync.base import SyncError
    from psr_ray.weight_sync.probe import REFERENCE_FILE, record_reference

    engines, base, probe, model_dir = setup
    version = ray_cluster.get(engines[0].policy_version.remote())
    new, other = perturbed(base, seed=8), perturbed(base, seed=9)
    # The trainer's side: the export and, beside it, the reference of its tensors (or of other ones).
    (tmp_path / "good").mkdir()
    good = export_of(new, model_dir, tmp_path / "good")
    record_reference(good, new, probe)
    (tmp_path / "tampered").mkdir()
    tampered = export_of(perturbed(base, seed=10), model_dir, tmp_path / "tampered")
    record_reference(tampered, other, probe)
    assert (tmp_path / "good" / REFERENCE_FILE).is_file()

    forbid_tensor_loads(monkeypatch)
    summary = sync_stage(engines, pushed=None, policy_dir=good, policy_version=version + 1, probe=probe,
                         timeout_s=120)  # fmt: skip
    assert summary["transport"] == "export" and summary["reloaded_from_export"] == 2
    assert summary["max_probe_error"] < 1e-4 and set(summary["probe_errors"]) == {"sync-rollout", "sync-judge"}
    with pytest.raises(SyncError, match="does not serve the trainer's weights"):
        sync_stage(engines, pushed=None, policy_dir=tampered, policy_version=version + 2, probe=probe,
                   timeout_s=120)  # fmt: skip

    monkeypatch.undo()
    assert_serving(ray_cluster, engines, new, probe, version + 1)
