"""Where an actor is, for error messages: its node and the log files to read there, or why it has none.

A hang message used to point at `/tmp/ray/session_latest/logs` whatever happened: on a cluster that is the
driver node's folder (the engine runs elsewhere), and an actor never placed has no log at all (issue 26).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Actor states in which it has no process (ray.util.state's ActorState.state).
_UNPLACED = ("PENDING_CREATION", "DEPENDENCIES_UNREADY")


def log_folder(node: dict[str, Any]) -> str:
    """A node's Ray log folder (`<temp dir>/session_*/logs`), from a `ray.nodes()` entry."""
    socket = node.get("RayletSocketName") or node.get("ObjectStoreSocketName") or ""
    return str(Path(socket).parent.parent / "logs") if socket else "?"


def describe_actor(actor: dict[str, Any] | None, nodes: list[dict[str, Any]]) -> str:
    """`on node 10.0.0.3 (ab12cd34), pid 123: its log is <logs>/worker-*-123.err`, or why there is no log.
    `actor`: a `ray.util.state` actor record as a dict (state, node_id, pid, required_resources)."""
    if actor is None:
        return "not found in the cluster's actor table"
    state = actor.get("state", "?")
    if state in _UNPLACED:
        asks = ", ".join(f"{k}: {v:g}" for k, v in sorted((actor.get("required_resources") or {}).items()))
        asks = f" ({asks})" if asks else ""
        return f"never placed ({state}): no live node has what it asks{asks}; it has no process and no log"
    node = next((n for n in nodes if n.get("NodeID") == actor.get("node_id")), None)
    where = f"node {node.get('NodeManagerAddress', '?')} ({str(actor.get('node_id'))[:8]})" if node else "a lost node"
    pid = actor.get("pid")
    if node is None or not pid:
        return f"{state} on {where}"
    return f"{state} on {where}, pid {pid}: its log is {log_folder(node)}/worker-*-{pid}.err on that node"


def where_is(names: list[str]) -> str:
    """`name: <describe_actor>` for each named actor, `; `-joined; empty when Ray cannot say (never raises:
    it only adds to an error message)."""
    try:
        import ray

        nodes = ray.nodes()
        parts = []
        for name in names:
            records = sorted(_actor_records(name), key=lambda a: a.get("state") == "DEAD")
            parts.append(f"{name}: {describe_actor(records[0] if records else None, nodes)}")
        return "; ".join(parts)
    except Exception:  # noqa: BLE001 - the error being reported matters more than where its actor is
        return ""


def _actor_records(name: str) -> list[dict[str, Any]]:
    """The actors of that name in the connected cluster's GCS actor table; a pending one's resource asks come
    from Ray's state API when the dashboard answers (the table has none; the API alone could reach another
    cluster's dashboard on this machine, so it never decides which actors exist)."""
    import ray
    from ray._private import state

    records = [{"actor_id": a.get("ActorID"), "state": a.get("State"), "pid": a.get("Pid"),
                "node_id": (a.get("Address") or {}).get("NodeID")}
               for a in state.actors().values() if a.get("Name") == name]  # fmt: skip
    if any(r["state"] in _UNPLACED for r in records):
        try:
            from ray.util.state import list_actors

            found = list_actors(address=ray.get_runtime_context().gcs_address, filters=[("name", "=", name)],
                                detail=True, raise_on_missing_output=False)  # fmt: skip
            asks = {a.actor_id: a.required_resources for a in found}
            for record in records:
                record["required_resources"] = asks.get(record["actor_id"])
        except Exception:  # noqa: BLE001 - no dashboard (a test's Ray): the asks stay unnamed
            pass
    return records
