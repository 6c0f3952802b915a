"""EnginePool's call accounting without Ray: back-off, deaths in a row, and the per-engine unavailability bound
(issue 26 §2: a per-call clock restarted by every re-send never ran out)."""

from __future__ import annotations

import pytest

from psr_ray.engines import pool as pool_module
from psr_ray.engines.pool import EnginePool


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(pool_module.time, "monotonic", c)
    return c


def test_a_restarting_engine_is_waited_out_then_fails_the_run_after_its_bound(clock):
    pool = EnginePool("judge", ["a0", "a1"], max_restarts=2, unavailable_timeout_s=60.0)
    pool.started(0)
    assert pool.failed(0, restarting=True, reason="ActorUnavailableError: restarting") is True  # first of an outage
    for _ in range(30):  # re-sent every 2 s: each lost call is one more of the same outage, not a new clock
        clock.now += 2.0
        pool.started(0)
        assert pool.failed(0, restarting=True) is False
    clock.now += 0.5  # 60.5 s after the first lost call
    pool.started(0)
    with pytest.raises(RuntimeError, match=r"judge engine psr-judge-0 has been unavailable for 60 s "
                       r"\(run.engine_unavailable_timeout_s=60; last error: ActorUnavailableError: gone\)"):  # fmt: skip
        pool.failed(0, restarting=True, reason="ActorUnavailableError: gone")


def test_an_engine_that_comes_back_is_used_again_and_its_outage_clock_resets(clock):
    pool = EnginePool("rollout", ["a0"], max_restarts=2, unavailable_timeout_s=60.0)
    pool.started(0)
    pool.failed(0, restarting=True)
    assert pool.pick() is None  # backing off while Ray restarts it
    clock.now += 50.0
    assert pool.pick() == 0
    pool.started(0)
    pool.succeeded(0)  # it came back
    clock.now += 50.0
    pool.started(0)
    assert pool.failed(0, restarting=True) is True  # a new outage, timed from now
    clock.now += 50.0
    pool.started(0)
    pool.failed(0, restarting=True)  # 50 s into the new outage: still within the bound


def test_deaths_in_a_row_on_every_engine_fail_the_run(clock):
    pool = EnginePool("rollout", ["a0"], max_restarts=1)
    for _ in range(1):
        pool.started(0)
        pool.failed(0)
        clock.now += 10
    pool.started(0)
    with pytest.raises(RuntimeError, match="every rollout engine died 2 times in a row"):
        pool.failed(0)
