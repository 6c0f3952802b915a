"""Error messages say where an actor is (psr_ray/runtime/locate.py); the live case is in tests/test_faults.py."""

from psr_ray.runtime.locate import describe_actor, log_folder

NODE = {"NodeID": "ab12cd34ef", "NodeManagerAddress": "10.0.0.3",
        "RayletSocketName": "/tmp/ray/session_2026-12-06_1/sockets/raylet"}  # fmt: skip


def test_a_placed_actor_is_named_by_node_pid_and_log_file():
    actor = {"state": "ALIVE", "node_id": "ab12cd34ef", "pid": 4321}
    assert log_folder(NODE) == "/tmp/ray/session_2026-12-06_1/logs"
    assert describe_actor(actor, [NODE]) == ("ALIVE on node 10.0.0.3 (ab12cd34), pid 4321: its log is "
                                             "/tmp/ray/session_2026-12-06_1/logs/worker-*-4321.err on that node")  # fmt: skip


def test_an_actor_never_placed_has_no_log_and_says_what_it_asks():
    actor = {"state": "PENDING_CREATION", "node_id": None, "pid": None,
             "required_resources": {"CPU": 1.0, "psr_engine": 1.0}}  # fmt: skip
    assert describe_actor(actor, [NODE]) == ("never placed (PENDING_CREATION): no live node has what it asks "
                                             "(CPU: 1, psr_engine: 1); it has no process and no log")  # fmt: skip


def test_an_actor_on_a_lost_node_or_unknown_says_so():
    assert describe_actor({"state": "RESTARTING", "node_id": "gone", "pid": 7}, [NODE]) == "RESTARTING on a lost node"
    assert describe_actor(None, [NODE]) == "not found in the cluster's actor table"
