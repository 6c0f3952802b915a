"""Waiting on Ray with a deadline: every wait on an engine ends, and a late one is named.

A hung engine (a stuck collective, a wedged GPU) would otherwise stall the run silently; with a deadline the
run fails with a `TimeoutError` that names the actors that did not answer (`run.engine_*_timeout_s`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from psr_ray.runtime.locate import where_is


def get_all(refs: Sequence[Any], *, labels: Sequence[str], timeout_s: float, what: str) -> list[Any]:
    """`ray.get(refs)` once every ref is ready within `timeout_s`; otherwise a TimeoutError naming the
    `labels` (one per ref, e.g. the engine's actor name) of the refs still pending, and `what` they owed."""
    import ray

    refs = list(refs)
    if not refs:
        return []
    _, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    if pending:
        late = set(pending)
        names = sorted({label for ref, label in zip(refs, labels, strict=True) if ref in late})
        raise TimeoutError(f"{', '.join(names)} did not answer {what} within {timeout_s:.0f} s; is it hung? "
                           f"({where_is(names) or 'see the Ray logs of its node'})")  # fmt: skip
    return ray.get(refs)
