"""Peak memory per node on a cluster (psr_ray/runtime/node_memory.py) and its lines in results.md."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from psr_ray.config import REPO_ROOT
from psr_ray.evaluation.run_results import node_memory_lines


def test_each_nodes_highest_peak_is_reported_with_its_stage_and_roles():
    per_stage = {
        "start": {"10.0.0.2 aaaa": {"peak": 1.0, "roles": {"engine psr-rollout-0": 0.9}}},
        "iter 1/1 search+train": {
            "10.0.0.2 aaaa": {"peak": 2.5, "roles": {"engine psr-rollout-0": 1.9, "Ray system": 0.3}},
            "10.0.0.3 bbbb": {"peak": 6.0, "roles": {"trainer worker 1": 3.0, "trainer worker 2": 2.9}},
        },
    }
    assert node_memory_lines(per_stage) == (
        "Peak memory per node (PSS of the node's Ray processes, GiB):\n"
        "- 10.0.0.2 aaaa: 2.5 in `iter 1/1 search+train` (engine psr-rollout-0 1.90, Ray system 0.30)\n"
        "- 10.0.0.3 bbbb: 6.0 in `iter 1/1 search+train` (trainer worker 1 3.00, trainer worker 2 2.90)"
    )
    assert node_memory_lines({}) == ""


_TWO_NODES = """
import json
import numpy as np
import ray
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from psr_ray.runtime.node_memory import NodeMemory, spans_nodes

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
try:
    worker = cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address)
    cluster.wait_for_nodes()
    nodes = NodeMemory()
    before = nodes.take()

    @ray.remote(num_cpus=1)
    class Hog:
        def __init__(self):
            self.block = np.ones(300 * 2**20 // 8)  # 300 MiB, touched

        def ready(self):
            return True

    hog = Hog.options(scheduling_strategy=NodeAffinitySchedulingStrategy(worker.node_id, soft=False)).remote()
    ray.get(hog.ready.remote())
    import time; time.sleep(2.5)
    after = nodes.take()
    print(json.dumps({"spans": spans_nodes(), "worker": worker.node_id[:8], "before": before, "after": after}))
    nodes.stop()
finally:
    ray.shutdown()
    cluster.shutdown()
"""


@pytest.mark.ray
def test_a_sampler_on_each_node_sees_that_nodes_processes():
    """A simulated two-node cluster: a 300 MiB actor on the worker node raises that node's peak, by its role,
    and not the head's. (Its own process: the test session's Ray cannot be re-pointed at another cluster.)"""
    done = subprocess.run([sys.executable, "-c", _TWO_NODES], capture_output=True, text=True, timeout=300,
                          cwd=REPO_ROOT)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["spans"] and len(result["after"]) == 2
    (worker,) = [label for label in result["after"] if label.endswith(result["worker"])]
    (head,) = [label for label in result["after"] if label != worker]
    gained = result["after"][worker][0] - result["before"][worker][0]
    assert gained > 0.25, result  # the hog's 300 MiB (0.29 GiB), counted on its own node
    assert result["after"][worker][1].get("Ray Train/Data actors", 0) > 0.25, result  # a ray:: actor's role
    assert result["after"][head][0] - result["before"][head][0] < 0.2, result  # not counted on the head
