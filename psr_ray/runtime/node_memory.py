"""Peak memory on every node of a multi-node cluster, by role (issue 26: results.md showed the driver process
alone, 0.4 GiB, while each engine held ~1.9 GB on another node).

One small actor per node (no CPU asked, pinned to the node) runs `memory.PeakMemory` over the tree of that
node's raylet, which is the parent of every Ray worker there: the engines, the trainer workers, Ray Train and
Ray Data actors. `NodeMemory.take()` collects each node's peak since the last take, with the split by role at
that peak. Nodes that join later get a sampler at the next take; a lost node's figures end with it.
"""

from __future__ import annotations

from typing import Any


class _Sampler:
    """On one node: the peak memory of the raylet's process tree (this actor is a child of that raylet)."""

    def __init__(self) -> None:
        import os

        import psutil

        from psr_ray.runtime.memory import PeakMemory

        raylet = psutil.Process(os.getpid()).parent()
        self._peak = PeakMemory(root_pid=raylet.pid if raylet else None).start()

    def take(self) -> tuple[float, dict[str, float]]:
        return self._peak.take_with_roles()


class NodeMemory:
    """The driver's side: a sampler per live node; `take()` -> {"<ip> <node id>": (peak GiB, {role: GiB})}."""

    def __init__(self, timeout_s: float = 10.0):
        self._timeout = timeout_s
        self._samplers: dict[str, Any] = {}  # node label -> actor

    def _ensure_samplers(self) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from psr_ray.runtime.cluster import live_nodes, node_label

        actor_cls = ray.remote(num_cpus=0, max_restarts=0)(_Sampler)
        for node in live_nodes():
            label = node_label(node)
            if label not in self._samplers:
                strategy = NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
                self._samplers[label] = actor_cls.options(scheduling_strategy=strategy).remote()

    def take(self) -> dict[str, tuple[float, dict[str, float]]]:
        """Each reachable node's peak since the previous take (a node that does not answer in time is left out)."""
        import ray

        self._ensure_samplers()
        refs = {label: actor.take.remote() for label, actor in self._samplers.items()}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=self._timeout)
        out = {}
        for label, ref in refs.items():
            if ref in ready:
                try:
                    out[label] = ray.get(ref)
                except Exception:  # noqa: BLE001 - a lost node's sampler: its figures end with it
                    self._samplers.pop(label, None)
        return out

    def stop(self) -> None:
        import ray

        for actor in self._samplers.values():
            ray.kill(actor)
        self._samplers.clear()


def spans_nodes() -> bool:
    """More than one live node in the connected cluster (one node: the driver's own sampler sees it all)."""
    from psr_ray.runtime.cluster import live_nodes

    return len(live_nodes()) > 1


class RunMemory:
    """A run's memory: this node's run processes (`memory.PeakMemory`, the driver's tree) and, once
    `watch_nodes` finds a cluster, every node's (`NodeMemory`). `take()` -> (GiB, roles, {node: (GiB, roles)})."""

    def __init__(self) -> None:
        from psr_ray.runtime.memory import PeakMemory

        self._local = PeakMemory().start()
        self._nodes: NodeMemory | None = None

    def watch_nodes(self, *, joined: bool) -> None:
        """Samples every node when the run joined a cluster or it spans nodes (the driver's tree is not the run)."""
        if joined or spans_nodes():
            self._nodes = NodeMemory()

    def take(self) -> tuple[float, dict[str, float], dict[str, tuple[float, dict[str, float]]]]:
        return (*self._local.take_with_roles(), self._nodes.take() if self._nodes is not None else {})

    def stop(self) -> None:
        self._local.stop()
        if self._nodes is not None:
            self._nodes.stop()
