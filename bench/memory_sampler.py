"""The driver's memory sampler (psr_ray/runtime/memory.py `PeakMemory`): its CPU cost per second of run, on a
process tree shaped like a run's (issue 25 item 4: "under 1% of a core").

Arms, run in alternation on the same tree of child processes, each watching it for `--seconds` at the
driver's 1 s interval:
  (a) every tick: a full sample each second (`full_every_s=1`: the tree listed, every process's cmdline and
      smaps_rollup read), what the sampler did before;
  (b) adaptive: the defaults (each tick reads /proc/PID/statm; a full sample only when the PSS could have
      passed the peak, the tree re-listed every 10 s, a full sample at least every 60 s).
The children stand for Ray workers, engines and trainer workers: Python with torch imported (thousands of
mappings), `--mib` MiB of private memory written, and 16 idle threads each. The bench's own main thread only
sleeps, so its CPU time (`time.process_time`) over an arm is the sampler's cost. Writes
bench/results/memory_sampler.md.

    flock /tmp/psr_heavy.lock .venv/bin/python bench/memory_sampler.py   # about 3 min
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
GOAL = 0.01  # of one core

CHILD = """
import sys, threading, time
import torch  # noqa: F401  (the mappings a Ray worker holds)
private = bytearray({mib} * 2**20)
for i in range(0, len(private), 4096):
    private[i] = 1
for _ in range(16):
    threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()
print("ready", flush=True)
sys.stdin.readline()
"""


def start_children(num: int, mib: int) -> list[subprocess.Popen]:
    children = [subprocess.Popen([sys.executable, "-c", CHILD.format(mib=mib)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True) for _ in range(num)]  # fmt: skip
    for child in children:
        if child.stdout.readline().strip() != "ready":
            raise RuntimeError("a child process failed to start")
    return children


def watch(seconds: float, **kwargs: float) -> dict[str, float]:
    """One arm: a `PeakMemory` over this process's tree for `seconds`; its CPU per second and samples."""
    from psr_ray.runtime.memory import PeakMemory

    memory = PeakMemory(interval_s=1.0, **kwargs)
    cpu, wall = time.process_time(), time.perf_counter()
    with memory:
        time.sleep(seconds)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {"cpu_per_s": cpu / wall, "thread_cpu_per_s": memory.cpu_s / wall, "wall_s": wall,
            "full_samples": memory.num_full_samples, "peak_gib": memory.peak_gib}  # fmt: skip


def tree_size() -> tuple[int, int, float]:
    """(processes, threads, resident GiB) of this process's tree."""
    import psutil

    procs = [psutil.Process(), *psutil.Process().children(recursive=True)]
    return len(procs), sum(p.num_threads() for p in procs), sum(p.memory_info().rss for p in procs) / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--children", type=int, default=8)
    parser.add_argument("--mib", type=int, default=192, help="private memory each child writes")
    parser.add_argument("--seconds", type=float, default=30.0, help="per arm and repeat")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(HERE / "results" / "memory_sampler.md"))
    args = parser.parse_args()
    arms = {"every tick": {"full_every_s": 1.0}, "adaptive": {}}
    children = start_children(args.children, args.mib)
    try:
        procs, threads, rss = tree_size()
        runs: list[tuple[str, dict[str, float], float]] = []
        for _ in range(args.repeats):
            for arm, kwargs in arms.items():
                runs.append((arm, watch(args.seconds, **kwargs), os.getloadavg()[0]))
                print(arm, runs[-1][1], flush=True)
    finally:
        for child in children:
            child.kill()
            child.wait()
    med = {arm: statistics.median(r["cpu_per_s"] for a, r, _ in runs if a == arm) for arm in arms}
    out = [
        "# The driver's memory sampler: CPU per second of run (bench/memory_sampler.py)",
        "",
        f"Command: `{' '.join(['bench/memory_sampler.py', *sys.argv[1:]])}`. Machine: {os.cpu_count()} cores, "
        f"{platform.system()} {platform.release()}; shared with other engineers' jobs (1-minute load average "
        "after each arm shown). Tree watched: the bench and its children, "
        f"{procs} processes, {threads} threads, {rss:.1f} GiB resident (each child: torch imported, {args.mib} MiB "
        "written, 16 idle threads). Interval 1 s. CPU: `time.process_time` of the bench process (whose main "
        "thread only sleeps) over the arm's wall time; the sampler thread's own `time.thread_time` beside it.",
        "",
        "| run | arm | wall s | full samples | CPU s per s (process) | CPU s per s (sampler thread) | peak GiB | "
        "load avg |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n, (arm, r, load) in enumerate(runs, 1):
        out.append(f"| {n} | {arm} | {r['wall_s']:.1f} | {r['full_samples']:.0f} | {r['cpu_per_s']:.4f} | "
                   f"{r['thread_cpu_per_s']:.4f} | {r['peak_gib']:.2f} | {load:.2f} |")  # fmt: skip
    verdict = "met" if med["adaptive"] < GOAL else "missed"
    out += [
        "",
        f"Medians: every tick **{med['every tick']:.2%}** of a core, adaptive **{med['adaptive']:.2%}** "
        f"({med['every tick'] / max(med['adaptive'], 1e-9):.0f}x less); goal < {GOAL:.0%}: {verdict}. A full "
        "sample's cost grows with the tree's processes and resident memory (smaps_rollup walks the page tables); "
        "a tick's does not (statm is the kernel's counters).",
    ]
    Path(args.out).write_text("\n".join(out) + "\n")
    print("\n".join(out))


if __name__ == "__main__":
    main()
