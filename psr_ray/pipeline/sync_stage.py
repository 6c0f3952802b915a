"""The loop's sync stage: the trainer's push is checked, completed where needed, and summarized.

The trainer's rank 0 pushes the new weights into every engine at the end of training (`weight_sync.push`
with the sender the loop built by `weight_sync.sender_for`) and its `SyncReport` comes back in the training
result. This stage then makes sure every
engine serves the new policy, verified: an engine that does not (a resumed run whose push happened before
the driver died, an engine Ray restarted after the push, a push that failed and rolled back) is reloaded
from the checkpoint's HF export through the same transaction and probe (export.py: the engines read the
folder, the driver only its headers and the reference the trainer recorded beside it). If that fails too,
the stage raises with the push's error and the reload's, every engine still serving its old policy.
"""

from __future__ import annotations

from typing import Any

from psr_ray.weight_sync.base import SyncError, SyncReport, engine_versions
from psr_ray.weight_sync.probe import ProbeSpec


def sync_stage(
    engines: list[Any],
    *,
    pushed: dict[str, Any] | None,
    policy_dir: str,
    policy_version: int,
    probe: ProbeSpec,
    timeout_s: float,
) -> dict[str, Any]:
    """Every engine serving `policy_version` (the weights in `policy_dir`), verified; returns the stage's
    summary for state.json and the results table."""
    import ray

    from psr_ray.weight_sync.export import ExportSender

    push = SyncReport.from_dict(pushed) if pushed else None
    states = ray.get([e.update_state.remote() for e in engines], timeout=timeout_s)
    ray.get([e.wake_up.remote() for e, s in zip(engines, states, strict=True) if s == "asleep"], timeout=timeout_s)
    versions = engine_versions(engines, timeout_s=timeout_s)
    stale = [e for e, v in zip(engines, versions, strict=True) if v != policy_version]
    reload = None
    if stale:
        sender = ExportSender(stale, folder=policy_dir, probe=probe, restore_dir=None, timeout_s=timeout_s)
        reload = sender.reload(policy_version=policy_version)  # the driver reads no tensor (export.py)
        if not reload.ok:
            before = f"the trainer's push failed: {push.error}; then " if push and not push.ok else ""
            raise SyncError(f"weight sync to policy {policy_version} failed: {before}reloading "
                            f"{len(stale)} engine(s) from {policy_dir} failed: {reload.error}")  # fmt: skip
    versions = engine_versions(engines, timeout_s=timeout_s)
    if any(v != policy_version for v in versions):
        raise SyncError(f"after the sync, engines serve policy versions {versions}, expected {policy_version}")
    # What a later failed sync restores: the export of the weights these engines now serve.
    ray.get([e.serving_from.remote(policy_dir, policy_version=policy_version) for e in engines], timeout=timeout_s)
    return summarize(push, reload, policy_version=policy_version) | {"engine_versions": versions}


def summarize(push: SyncReport | None, reload: SyncReport | None, *, policy_version: int) -> dict[str, Any]:
    """One record of the stage: the push's figures (what the transport did), the export reload's if any."""
    main = push if push is not None and push.ok else reload
    errors = {**(push.probe_errors if push and push.ok else {}), **(reload.probe_errors if reload else {})}
    summary: dict[str, Any] = {
        "policy_version": policy_version,
        "transport": main.backend if main else None,
        "num_engines": main.num_engines if main else 0,
        "num_bytes": main.num_bytes if main else 0,
        "seconds": (push.seconds if push else 0.0) + (reload.seconds if reload else 0.0),
        "gbytes_per_s": main.gbytes_per_s if main else None,
        "verify_seconds": (push.verify_seconds if push else 0.0) + (reload.verify_seconds if reload else 0.0),
        "max_probe_error": max(errors.values()) if errors else None,
        "probe_errors": errors,
        "reloaded_from_export": reload.num_engines if reload else 0,
        "push_error": push.error if push else None,
        # Where the weights went (Ray node ids): the sender (a trainer worker; the driver for a reload) and each
        # engine, from the push, an engine reloaded afterwards from the reload.
        "sender_node": main.sender_node if main else None,
        "engine_nodes": {**(push.engine_nodes if push else {}), **(reload.engine_nodes if reload else {})},
    }
    return summary


def sync_columns(sync: dict[str, Any] | None) -> dict[str, Any]:
    """The results table's weight-sync columns for an iteration's sync stage."""
    if not sync:
        return {}
    return {"sync_transport": sync.get("transport"), "sync_engines": sync.get("num_engines"),
            "sync_mb": sync.get("num_bytes", 0) / 1e6, "sync_s": sync.get("seconds"),
            "sync_gbps": sync.get("gbytes_per_s")}  # fmt: skip
