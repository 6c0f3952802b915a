"""Peak memory of a run on this machine: the proportional set size (PSS) of this process and all its
descendants (with a local Ray: the raylet, the engines, the trainer workers, Ray Data tasks), sampled every
second. PSS counts a shared page once over the processes that map it, so the sum is what the machine holds,
unlike a sum of RSS. On a multi-node cluster it covers the driver's node only."""

from __future__ import annotations

import os
import threading
from typing import Any


class PeakMemory:
    """A sampling thread; `take()` returns the peak (GiB) since the previous `take()`, `peak_gib` the overall.
    The overall is folded from the windows, so it is exactly the largest `take()` (or the window still open)."""

    def __init__(self, interval_s: float = 1.0):
        self._interval, self._since, self._overall = interval_s, 0, 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
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
        self._sample()
        with self._lock:
            peak, self._since = self._since, 0
            self._overall = max(self._overall, peak)
        return peak / 2**30

    @property
    def peak_gib(self) -> float:
        with self._lock:
            return max(self._overall, self._since) / 2**30

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample()

    def _sample(self) -> None:
        import psutil

        total = 0
        me = psutil.Process()
        for proc in [me, *me.children(recursive=True)]:
            try:
                total += proc.memory_full_info().pss
            except psutil.Error:  # exited meanwhile, or not ours to read
                pass
        with self._lock:
            self._since = max(self._since, total)


def machine_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
