"""Are the run's folders the same folders on every node? Checked right after Ray starts, for any driver on a
multi-node cluster, submitted as a job or joined directly (issue 26: the mount check used to run only inside a
Ray job, and `run.cache_dir` or a local `model.path` only on the driver, though engines on other nodes open them).

The driver writes a probe file with a random token into each folder; a tiny task pinned to every live node reads
it back. A node that does not see the driver's token there has its own folder of that name (a node-local disk)
or none: the run would fail later, or worse, write checkpoints another node never reads.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

from psr_ray.config import PSRConfig, UserError

PROBE = ".psr-ray-node-probe"
CHECK_TIMEOUT_S = 60.0


def shared_folders(cfg: PSRConfig, output_dir: str | os.PathLike | None) -> dict[str, str]:
    """field -> absolute folder that engines or trainer workers on other nodes open: the run folder, the cache
    (the embedded model's conversion, cached inits that engines load), a local model folder. Only folders that
    exist here are probed (a hub id is each node's own download)."""
    candidates = {"run.output_dir": output_dir, "run.cache_dir": cfg.run.cache_dir, "model.path": cfg.model.path}
    folders = {}
    for field, path in candidates.items():
        if path:
            folder = Path(os.path.expanduser(str(path))).absolute()
            if folder.is_dir():
                folders[field] = str(folder)
    return folders


def seen_on_node(folders: dict[str, str], name: str, token: str) -> dict[str, str]:
    """On one node: field -> why the driver's probe is not seen there ("" when it is)."""
    seen = {}
    for field, folder in folders.items():
        try:
            seen[field] = "" if (Path(folder) / name).read_text() == token else "another file of the probe's name"
        except FileNotFoundError:
            seen[field] = "no such folder" if not Path(folder).is_dir() else "a different folder of that name"
        except OSError as err:
            seen[field] = f"unreadable ({err.strerror})"
    return seen


def node_path_errors(reports: dict[str, dict[str, str]], folders: dict[str, str]) -> list[str]:
    """One phrase per folder that some node does not share with the driver, naming the nodes."""
    errors = []
    for field, folder in folders.items():
        missing = [f"{node} ({report[field]})" for node, report in reports.items() if report.get(field)]
        if missing:
            errors.append(f"{field} {folder} is not the driver's folder on node(s) {', '.join(missing)}")
    return errors


def check_node_paths(cfg: PSRConfig, output_dir: str | os.PathLike | None) -> list[str]:
    """Raises a UserError when a folder the run shares across nodes is not the same on every live node; returns
    warnings (a node whose check did not answer in time). A one-node cluster, or
    `run.require_shared_storage=false`, is not checked."""
    from psr_ray.runtime.node_memory import spans_nodes

    if not cfg.run.require_shared_storage or not spans_nodes():
        return []
    with contextlib.suppress(OSError):  # made now, so a node-local default (~/.cache) is caught before the init
        Path(os.path.expanduser(cfg.run.cache_dir)).mkdir(parents=True, exist_ok=True)
    name, token = f"{PROBE}-{secrets.token_hex(4)}", secrets.token_hex(16)
    written = {}
    for field, folder in shared_folders(cfg, output_dir).items():
        try:
            (Path(folder) / name).write_text(token)
            written[field] = folder
        except OSError:
            pass  # a read-only folder (a shared model store, say): nothing to compare it by
    try:
        reports, late = node_reports(written, name, token)
    finally:
        for folder in written.values():
            (Path(folder) / name).unlink(missing_ok=True)
    errors = node_path_errors(reports, written)
    if errors:
        raise UserError(f"this run spans nodes, but {'; '.join(errors)}: engines and trainer workers there would "
                        "not see what this driver writes; put these folders on storage every node mounts (the "
                        "cluster/ files mount /mnt/cluster_storage) or, if each node really holds its own copy, "
                        "set run.require_shared_storage=false")  # fmt: skip
    return (
        [f"could not check the run's folders on node(s) {', '.join(late)} within {CHECK_TIMEOUT_S:g} s"] if late else []
    )


def node_reports(folders: dict[str, str], name: str, token: str) -> tuple[dict[str, dict[str, str]], list[str]]:
    """`seen_on_node` run on every live node (a task pinned to it, no CPU asked): ({"<ip> <node id>": report},
    nodes that did not answer within CHECK_TIMEOUT_S)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from psr_ray.runtime.cluster import live_nodes, node_label

    probe = ray.remote(num_cpus=0, max_retries=0)(seen_on_node)
    refs = {
        node_label(n): probe.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ).remote(folders, name, token)
        for n in live_nodes()
    }
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=CHECK_TIMEOUT_S)
    reports = {node: ray.get(ref) for node, ref in refs.items() if ref in ready}
    return reports, sorted(set(refs) - set(reports))
