"""Role attribution of the run's memory (psr_ray.runtime.memory): pure rules, then a real process tree."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from psr_ray.runtime.memory import ENGINE_NAME_ENV, OBJECT_STORE, PeakMemory, process_role, split_by_role


def test_process_roles_from_ray_titles_and_command_lines():
    assert process_role(["python", "-m", "psr_ray"], is_root=True) == "driver"
    assert process_role(["ray::EngineActor.propose"], engine_name="psr-rollout-0") == "engine psr-rollout-0"
    assert process_role(["ray::EngineActor"]) == "engine"  # started by someone else: no name in its environment
    assert process_role(["ray::RayTrainWorker"]) == "trainer worker"
    assert process_role(["ray::RayTrainWorker._RayTrainWorker__execute"]) == "trainer worker"
    assert process_role(["ray::IDLE"]) == "idle Ray workers"
    for title in ("ray::TrainController.run", "ray::SplitCoordinator.get", "ray::ReadStepPairManifest", "ray::"):
        assert process_role([title]) == "Ray Train/Data actors", title
    system = "Ray system (raylet, GCS, dashboard, agents)"
    assert process_role(["/venv/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet", "--head"]) == system
    assert process_role(["/venv/ray/core/src/ray/gcs/gcs_server", "--x"]) == system
    assert process_role(["ray-dashboard-NodeHead-0 (/venv/bin/python -B -c ...)"]) == system
    assert process_role(["/venv/bin/python", "-u", "/venv/ray/dashboard/agent.py"]) == system
    assert process_role(["sleep", "5"]) == "other" and process_role([]) == "other"


def test_split_by_role_numbers_trainer_workers_and_gives_shared_memory_to_the_object_store():
    samples = [
        ("driver", 10, 500, 0),
        ("trainer worker", 31, 4000, 0),
        ("trainer worker", 22, 3000, 100),
        ("engine psr-rollout-0", 40, 2500, 20),
        ("Ray system (raylet, GCS, dashboard, agents)", 5, 900, 800),
    ]
    split = split_by_role(samples)
    assert split == {
        "driver": 500,
        "trainer worker 1": 2900,
        "trainer worker 2": 4000,
        "engine psr-rollout-0": 2480,
        "Ray system (raylet, GCS, dashboard, agents)": 100,
        OBJECT_STORE: 920,
    }
    assert sum(split.values()) == sum(pss for _, _, pss, _ in samples)


CHILD = """
import mmap, os, time
private = bytearray(96 * 2**20)                       # zero-filled: resident
path = f"/dev/shm/psr_test_memory_{os.getpid()}"
with open(path, "w+b") as f:
    f.truncate(64 * 2**20)
    shared = mmap.mmap(f.fileno(), 64 * 2**20)        # shared memory, as Ray's object store maps it
os.unlink(path)                                       # the mapping stays; nothing is left behind
shared.write(b"x" * 64 * 2**20)                       # touched: resident
print("ready", flush=True)
time.sleep(30)
"""


def test_peak_memory_attributes_a_real_process_tree_by_role():
    # Children that look like a named engine and a trainer worker (the titles Ray gives them), one of them
    # holding private and shared memory.
    env = dict(os.environ, **{ENGINE_NAME_ENV: "psr-judge-test"})
    engine = subprocess.Popen(["ray::EngineActor.judge", "-c", CHILD], executable=sys.executable, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    worker = subprocess.Popen(["ray::RayTrainWorker", "30"], executable="sleep")
    try:
        assert engine.stdout.readline().strip() == "ready", engine.stderr.read()
        time.sleep(0.2)
        with PeakMemory(interval_s=0.05) as memory:
            time.sleep(0.3)
            peak, roles = memory.take_with_roles()
    finally:
        engine.kill()
        worker.kill()
        engine.wait()
        worker.wait()
    # (A Ray cluster another test of this session started adds its own roles beside these.)
    assert {"driver", "engine psr-judge-test", "trainer worker 1", OBJECT_STORE} <= set(roles)
    assert abs(sum(roles.values()) - peak) < 1e-9
    assert 96 / 1024 < roles["engine psr-judge-test"] < 0.5  # its private bytearray and interpreter
    assert roles[OBJECT_STORE] > 60 / 1024  # the 64 MiB it wrote to shared memory
    assert list(roles) == sorted(roles, key=lambda r: -roles[r])  # largest first


GROWER = """
import sys
print("ready", flush=True)
sys.stdin.readline()
grown = bytearray(256 * 2**20)  # zero pages are not resident until written
for i in range(0, len(grown), 4096):
    grown[i] = 1
print("grown", flush=True)
sys.stdin.readline()
"""


def test_ticks_read_resident_sizes_and_sample_fully_only_when_the_peak_may_have_moved():
    child = subprocess.Popen([sys.executable, "-c", GROWER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        memory = PeakMemory(interval_s=0.02, root_pid=child.pid, relist_s=0.2, full_every_s=1e9,
                            tolerance_bytes=16 * 2**20)  # fmt: skip
        with memory:
            time.sleep(0.5)  # 25 ticks of a process that does not grow: the first tick's full sample only
            assert memory.num_full_samples == 1
            before = memory.peak_gib
            child.stdin.write("grow\n")
            child.stdin.flush()
            assert child.stdout.readline().strip() == "grown"
            # The ticks see the resident gain and sample: the peak gets the 256 MiB, without a take().
            deadline = time.monotonic() + 10
            while memory.peak_gib <= before + (256 - 16) / 1024 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert memory.peak_gib > before + (256 - 16) / 1024
            # A full sample taken while the child was still writing can leave up to the tolerance unseen, which
            # one more full sample may pick up: let the ticks settle before counting.
            time.sleep(0.5)
            grown = memory.num_full_samples
            time.sleep(0.3)
            assert memory.num_full_samples == grown  # steady again: no more full samples
        assert memory.cpu_s > 0
    finally:
        child.kill()
        child.wait()
