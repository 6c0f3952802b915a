"""Where a run's files live on a cluster: the checks `validate()` makes for runs that span nodes.

Trainer checkpoints, the HF export that engines on other nodes reload, and `state.json` are written under
`run.output_dir` by one node and read by others (and by the next job after a restart), so on a cluster that
folder must be on storage every node mounts (cluster/ files mount it at /mnt/cluster_storage).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

# Filesystem types (as /proc/mounts names them) that several nodes can mount at once.
SHARED_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "lustre", "ceph", "cifs", "smb3", "smbfs", "glusterfs", "gpfs", "beegfs", "wekafs",
    "fuse.s3fs", "fuse.gcsfuse", "fuse.mountpoint-s3", "fuse.juicefs", "fuse.ceph", "fuse.glusterfs",
    "fuse.rclone", "fuse.sshfs", "fuse.blobfuse2", "fuse.goofys",
})  # fmt: skip
RESERVED_RESOURCES = frozenset({"CPU", "GPU", "memory", "object_store_memory"})


def spans_nodes(cfg: Any) -> bool:
    """A run meant for a multi-node cluster: it joins one, or pins engines or trainers to node groups."""
    return bool(cfg.run.ray_address or cfg.rollout.node_resource or cfg.judge.node_resource
                or cfg.trainer.node_resource)  # fmt: skip


def filesystem_of(path: str | os.PathLike, mounts_text: str | None = None) -> tuple[str, str]:
    """(mount point, filesystem type) holding `path` or, if it does not exist yet, its nearest existing
    parent; read from /proc/mounts unless `mounts_text` (its format) is given."""
    if mounts_text is None:
        try:
            mounts_text = Path("/proc/mounts").read_text()
        except OSError:
            return "", "unknown"
    target = Path(os.path.expanduser(path)).absolute()
    while not target.exists() and target != target.parent:
        target = target.parent
    target = target.resolve()
    best = ("", "unknown")
    for line in mounts_text.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        mount_point = fields[1].replace("\\040", " ")
        inside = target == Path(mount_point) or Path(mount_point) in target.parents
        if inside and len(mount_point) >= len(best[0]):
            best = (mount_point, fields[2])
    return best


def in_ray_job() -> bool:
    """True in the driver of a submitted Ray job (the job supervisor sets this variable): on the cluster."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def storage_errors(cfg: Any, *, check_paths: bool, mounts_text: str | None = None) -> list[str]:
    """The mistakes in where a multi-node run keeps its files and how it asks for node groups. The mount
    itself is checked where the run writes: in its Ray job (`psr-ray validate` on a laptop, which lacks the
    cluster's mounts, checks only that the path is absolute)."""
    errors = []
    for field, name in (("rollout.node_resource", cfg.rollout.node_resource),
                        ("judge.node_resource", cfg.judge.node_resource),
                        ("trainer.node_resource", cfg.trainer.node_resource)):  # fmt: skip
        if name in RESERVED_RESOURCES or name != name.strip():
            errors.append(
                f"{field}={name!r} must name a custom resource of a node group (e.g. psr_engine), "
                f"not one of Ray's own ({', '.join(sorted(RESERVED_RESOURCES))})"
            )
    if cfg.run.resume not in ("never", "auto"):
        errors.append(f"run.resume must be never or auto, got {cfg.run.resume!r}")
    if not spans_nodes(cfg) or not cfg.run.output_dir or not cfg.run.require_shared_storage:
        return errors
    output_dir = os.path.expanduser(cfg.run.output_dir)
    if not os.path.isabs(output_dir):
        errors.append(
            f"run.output_dir={cfg.run.output_dir!r} is relative, but this run spans nodes (run.ray_address "
            "or a node_resource is set): a job's working folder is temporary and per node; use an "
            "absolute path on shared storage, e.g. /mnt/cluster_storage/psr/<run> (a single-node "
            "cluster: set run.require_shared_storage=false)"
        )
    elif check_paths and in_ray_job():
        mount_point, fstype = filesystem_of(output_dir, mounts_text)
        if fstype not in SHARED_FILESYSTEMS:
            errors.append(
                f"run.output_dir={cfg.run.output_dir!r} is on a {fstype} filesystem local to this node "
                f"(mounted at {mount_point or '?'}), but this run spans nodes: checkpoints, the HF export "
                "engines reload and state.json must be readable from every node; mount shared storage "
                "there (cluster/ files mount it at /mnt/cluster_storage) or, for a single-node cluster, "
                "set run.require_shared_storage=false"
            )
    return errors
