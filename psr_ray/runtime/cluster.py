"""Joining or starting the Ray cluster a command runs on.

Which cluster (Ray 2.60's `ray.init` would otherwise auto-connect to a `ray start` head it finds here, and
then refuse the run's `num_cpus` with "When connecting to an existing cluster, num_cpus and num_gpus must
not be provided"):
  - `run.ray_address` (auto, host:port, ray://host:port) or RAY_ADDRESS (set inside a submitted job): join it,
    with no resource arguments; the cluster's resources are what they are.
  - otherwise: start a separate local Ray sized for the run (`address="local"`), even when a `ray start` head
    runs on this machine (users start one to watch the dashboard). That head is named in a message with the
    setting that joins it instead (`run.ray_address=auto`).
An address that does not answer is a one-line error before `ray.init` spends its connection timeout.
"""

from __future__ import annotations

import math
import os
import socket
from typing import Any

from psr_ray.config import PSRConfig
from psr_ray.config.errors import UserError


def cpu_threads(num_cpus: float) -> int:
    """A CPU process's torch threads (a trainer worker's, an engine's): the whole CPUs it reserved, at least one."""
    return max(1, int(num_cpus))


def required_cpus(cfg: PSRConfig) -> int:
    """Logical CPUs the run's actors reserve at once: engines, trainer workers, and room for Ray Data tasks."""
    engines = sum(pool.num_engines * pool.num_cpus_per_engine for pool in (cfg.rollout, cfg.judge))
    trainer = cfg.trainer.num_workers * cfg.trainer.num_cpus_per_worker
    return math.ceil(engines + trainer) + 2


def cluster_address(cfg: PSRConfig) -> str | None:
    """The Ray cluster the run joins: `run.ray_address`, else $RAY_ADDRESS (set inside a submitted job); None
    (or "local") for a local Ray started on this machine."""
    address = cfg.run.ray_address or os.environ.get("RAY_ADDRESS") or None
    return None if address == "local" else address


def init_ray(cfg: PSRConfig, **kwargs: Any) -> Any:
    """Joins `run.ray_address` (or the cluster of a submitted job), or starts a local Ray sized for the run
    (see the module doc). Inside a submitted job Ray is already reachable and its runtime_env is left alone."""
    import ray

    from psr_ray.runtime import console

    if ray.is_initialized():
        return ray
    address = cluster_address(cfg)
    kwargs = console.ray_init_kwargs(local=address is None) | kwargs  # quiet console unless --verbose
    if address is not None:
        _join(ray, address, "run.ray_address" if cfg.run.ray_address else "RAY_ADDRESS", **kwargs)
        console.after_ray_init()
        return ray
    running = _running_head()
    num_cpus = max(os.cpu_count() or 1, required_cpus(cfg))
    if running is not None:
        print(f"[psr_ray] a Ray cluster started with `ray start` runs here ({running}); this run starts its own "
              f"local Ray with {num_cpus} CPUs. To run on that cluster instead, pass run.ray_address=auto")  # fmt: skip
    # A local cluster: logical CPUs may exceed cores (the embedded default oversubscribes 2 cores on purpose:
    # engines mostly wait on each other and the trainer), threads per process are kept at 1.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if cfg.run.malloc_mmap_threshold_mib:  # read by glibc as each process of the new cluster starts
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(cfg.run.malloc_mmap_threshold_mib * 2**20)
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=kwargs.pop("include_dashboard", None), **kwargs)
    console.after_ray_init()
    return ray


def _join(ray: Any, address: str, where: str, **kwargs: Any) -> None:
    if address == "auto":
        if _running_head() is None and not _gcs_processes():
            raise UserError(f"{where}=auto: no running Ray cluster found on this machine; start one with "
                            "`ray start --head`, give its host:port, or leave run.ray_address unset for a local Ray")  # fmt: skip
    else:
        host, port = _host_port(address)
        try:
            socket.create_connection((host, port), timeout=5.0).close()
        except OSError as err:
            raise UserError(f"{where} {address}: nothing answers at {host}:{port} ({err.strerror or err}); "
                            "is the Ray head running and reachable from here?") from None  # fmt: skip
    try:
        ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as err:  # includes Ray's AuthenticationError
        lines = [line for line in str(err).splitlines() if line.strip()]
        raise UserError(
            f"{where} {address}: cannot join the Ray cluster there ({lines[0] if lines else err})"
        ) from None
    print(f"[psr_ray] joined the Ray cluster at {address}")


def _host_port(address: str) -> tuple[str, int]:
    bare = address.removeprefix("ray://")
    host, _, port = bare.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"run.ray_address {address!r} must be auto, host:port or ray://host:port")
    return host.strip("[]"), int(port)


def _running_head() -> str | None:
    """The address a `ray start` on this machine recorded (`<temp dir>/ray_current_cluster`), if any."""
    from ray._private.utils import read_ray_address  # private but stable for years; no public equivalent

    return read_ray_address() or None


def _gcs_processes() -> frozenset[str]:
    from ray._private.services import find_gcs_addresses

    return find_gcs_addresses()


def live_nodes() -> list[dict[str, Any]]:
    """The connected cluster's live nodes, as `ray.nodes()` describes them."""
    import ray

    return [node for node in ray.nodes() if node.get("Alive")]


def node_label(node: dict[str, Any]) -> str:
    """`<ip> <node id prefix>`: a node named in reports (nodes of a simulated cluster share one ip)."""
    return f"{node.get('NodeManagerAddress', '?')} {node['NodeID'][:8]}"


def why_unplaceable(ask: dict[str, float]) -> str | None:
    """Why no live node of the connected cluster can take one process asking `ask` (e.g. an engine, a trainer
    worker) right now, as a phrase naming the resource none provides; None when a node has those resources
    in total (in use or not: then something else keeps it off). What a lost node with no replacement shows."""
    nodes = [node["Resources"] for node in live_nodes()]
    asks = ", ".join(f"{k}: {v:g}" for k, v in sorted(ask.items()))
    missing = sorted(k for k, v in ask.items() if not any(n.get(k, 0.0) >= v for n in nodes))
    if missing:
        return f"no live node of the cluster provides {', '.join(missing)} (each asks for {asks})"
    if not any(all(n.get(k, 0.0) >= v for k, v in ask.items()) for n in nodes):
        return f"no live node of the cluster has {asks} in total"
    return None
