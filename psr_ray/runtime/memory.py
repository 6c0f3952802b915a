"""Peak memory of a run on this machine: the proportional set size (PSS) of this process and all its
descendants (with a local Ray: the raylet, the engines, the trainer workers, Ray Data tasks), sampled every
second. PSS counts a shared page once over the processes that map it, so the sum is what the machine holds,
unlike a sum of RSS. On a multi-node cluster it covers the driver's node only.

Each sample also splits that sum by role (`process_role`: the driver, each engine, each trainer worker, Ray's
own processes, ...), and the shared-memory part of every process (`Pss_Shmem`: Ray's object store, whose
pages the raylet and every reader map) goes to one role of its own. `take_with_roles()` returns a stage's peak
with the split at the moment of that peak, so the roles add up to it.

A full sample (the process tree, every process's smaps_rollup, whose page-table walk costs kernel time in
proportion to the process's memory) every second cost ~10% of a core on a run's tree, so each tick reads
only every known process's resident size from /proc/PID/statm (kernel counters, O(1)), and takes a full
sample only when the PSS could have passed the window's peak: the PSS total is at most the last full sample's
plus the resident bytes every process gained since, so while that bound stays within `tolerance_bytes` of the
peak, no sample could raise it by more. The tree is re-listed every `relist_s` (a new process's whole
resident size counts as gained), and a full sample runs at least every `full_every_s` (pages shared with
processes outside the tree grow our PSS without any resident gain when those exit)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from typing import Any

# Set in every engine actor's environment (engines/pool.py), so its process is named by its engine.
ENGINE_NAME_ENV = "PSR_ENGINE_NAME"
OBJECT_STORE = "object store (shared memory)"
DRIVER = "driver"
TRAINER_WORKER = "trainer worker"
ENGINE = "engine"
# Ray's own processes; the dashboard's heads run as `ray-dashboard-<Name>-0` children.
RAY_SYSTEM_MARKERS = ("raylet", "gcs_server", "dashboard", "runtime_env", "log_monitor", "monitor.py")


def process_role(cmdline: Sequence[str], *, engine_name: str | None = None, is_root: bool = False) -> str:
    """The role a process plays in a run, from its command line (Ray names an actor's process
    `ray::<Class>` or `ray::<Class>.<method>`) and, for an engine, the name its environment carries."""
    if is_root:
        return DRIVER
    title = cmdline[0] if cmdline else ""
    if title.startswith("ray::"):
        cls = (title[len("ray::") :].split(".")[0].split() or [""])[0]
        if cls == "EngineActor":
            return f"{ENGINE} {engine_name}" if engine_name else ENGINE
        if cls == "RayTrainWorker":
            return TRAINER_WORKER
        if cls == "IDLE":
            return "idle Ray workers"
        return "Ray Train/Data actors"
    joined = " ".join(cmdline)
    if any(marker in joined for marker in RAY_SYSTEM_MARKERS):
        return "Ray system (raylet, GCS, dashboard, agents)"
    return "other"


def split_by_role(samples: list[tuple[str, int, int, int]]) -> dict[str, int]:
    """Bytes per role from (role, pid, pss, pss_shmem) per process: each process's shared memory goes to
    OBJECT_STORE, the rest to its role; trainer workers are numbered by pid (`trainer worker 1`, ...)."""
    workers = sorted(pid for role, pid, _, _ in samples if role == TRAINER_WORKER)
    out: dict[str, int] = {}
    for role, pid, pss, shmem in samples:
        if role == TRAINER_WORKER:
            role = f"{TRAINER_WORKER} {workers.index(pid) + 1}"
        out[role] = out.get(role, 0) + pss - shmem
        out[OBJECT_STORE] = out.get(OBJECT_STORE, 0) + shmem
    return out


def read_rss(pid: int) -> int:
    """Resident bytes from /proc/<pid>/statm: the kernel's counters, no walk of the page tables."""
    with open(f"/proc/{pid}/statm", "rb") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def read_pss(pid: int) -> tuple[int, int]:
    """(Pss, Pss_Shmem) in bytes from /proc/<pid>/smaps_rollup (one read, no per-mapping walk in Python)."""
    pss = shmem = 0
    if not os.path.exists(f"/proc/{pid}/smaps_rollup"):  # kernels before 4.14: psutil walks smaps
        import psutil

        return psutil.Process(pid).memory_full_info().pss, 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                pss = int(line.split()[1]) * 1024
            elif line.startswith("Pss_Shmem:"):
                shmem = int(line.split()[1]) * 1024
    return pss, shmem


class PeakMemory:
    """A sampling thread; `take()` returns the peak (GiB) since the previous `take()`, `peak_gib` the overall;
    `take_with_roles()` also the split by role (GiB) at that peak. The overall is folded from the windows, so it
    is exactly the largest `take()` (or the window still open). Ticks and full samples: the module docstring;
    `full_every_s=interval_s` takes a full sample every tick. `cpu_s`: the sampling thread's CPU seconds."""

    def __init__(self, interval_s: float = 1.0, *, root_pid: int | None = None, relist_s: float = 10.0,
                 full_every_s: float = 60.0, tolerance_bytes: int = 64 * 2**20):  # fmt: skip
        """`root_pid`: the tree of another process (e.g. a run started elsewhere) instead of this one's."""
        self._interval, self._since, self._overall = interval_s, 0, 0
        self._root_pid = root_pid
        self._relist_s, self._full_every_s, self._tolerance = relist_s, full_every_s, tolerance_bytes
        self._since_roles: dict[str, int] = {}
        self._engine_names: dict[tuple[int, float], str | None] = {}
        self._tree: list[tuple[Any, str]] = []  # (psutil.Process, role) of the last listing
        self._listed_at = self._full_at = -float("inf")
        self._full_pss = 0  # the last full sample's total, and each process's resident bytes then
        self._full_rss: dict[int, int] = {}
        self.num_full_samples = 0
        self.cpu_s = 0.0
        self._stop = threading.Event()
        self._lock = threading.Lock()  # the window's peak, read by take()
        self._sampling = threading.RLock()  # one tick or full sample at a time (take() samples from its thread)
        self._thread = threading.Thread(target=self._run, name="psr-peak-memory", daemon=True)

    def start(self) -> PeakMemory:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        with self._lock:
            self._overall = max(self._overall, self._since)

    def __enter__(self) -> PeakMemory:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def take(self) -> float:
        return self.take_with_roles()[0]

    def take_with_roles(self) -> tuple[float, dict[str, float]]:
        self._sample()
        with self._lock:
            peak, roles = self._since, self._since_roles
            self._since, self._since_roles = 0, {}
            self._overall = max(self._overall, peak)
        return peak / 2**30, {role: b / 2**30 for role, b in sorted(roles.items(), key=lambda item: -item[1])}

    @property
    def peak_gib(self) -> float:
        with self._lock:
            return max(self._overall, self._since) / 2**30

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            started = time.thread_time()
            self._tick()
            self.cpu_s += time.thread_time() - started

    def _tick(self) -> None:
        with self._sampling:
            self._tick_locked()

    def _tick_locked(self) -> None:
        now = time.monotonic()
        if now - self._full_at >= self._full_every_s:
            self._sample()
            return
        if now - self._listed_at >= self._relist_s:
            self._list()
        gained = 0
        for proc, _ in self._tree:
            try:
                gained += max(0, read_rss(proc.pid) - self._full_rss.get(proc.pid, 0))
            except OSError:  # exited meanwhile
                continue
        with self._lock:
            peak = self._since
        if self._full_pss + gained > peak + self._tolerance:
            self._sample()

    def _engine_name(self, proc: Any) -> str | None:
        key = (proc.pid, proc.create_time())  # a pid reused by another process is another key
        if key not in self._engine_names:
            self._engine_names[key] = proc.environ().get(ENGINE_NAME_ENV)
        return self._engine_names[key]

    def _list(self) -> None:
        """The tree now, each process with its role (re-read: an idle Ray worker becomes an actor)."""
        import psutil

        self._listed_at = time.monotonic()
        try:
            me = psutil.Process(self._root_pid)
            procs = [me, *me.children(recursive=True)]
        except psutil.Error:  # a watched process that ended
            self._tree = []
            return
        tree = []
        for proc in procs:
            try:
                cmdline = proc.cmdline()
                name = self._engine_name(proc) if cmdline[:1] and cmdline[0].startswith("ray::EngineActor") else None
            except (psutil.Error, OSError):  # exited meanwhile, or not ours to read
                continue
            tree.append((proc, process_role(cmdline, engine_name=name, is_root=proc.pid == me.pid)))
        self._tree = tree

    def _sample(self) -> None:
        with self._sampling:
            self._sample_locked()

    def _sample_locked(self) -> None:
        import psutil

        self._list()
        self._full_at = time.monotonic()
        self.num_full_samples += 1
        samples, rss = [], {}
        for proc, role in self._tree:
            try:
                rss[proc.pid] = read_rss(proc.pid)  # first: a later gain is then counted, never missed
                pss, shmem = read_pss(proc.pid)
            except (psutil.Error, OSError):  # exited meanwhile, or not ours to read
                continue
            samples.append((role, proc.pid, pss, shmem))
        total = sum(pss for _, _, pss, _ in samples)
        self._full_pss, self._full_rss = total, rss
        with self._lock:
            if total > self._since:
                self._since, self._since_roles = total, split_by_role(samples)


def machine_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
