"""Steady throughput and fixed costs of one fit, from its per-optimizer-step metrics. Pure: no torch, no Ray.

Every step's metrics (trainer/worker.py `step_metrics`) carry `train/num_tokens` (real tokens of the step's
sequences over all ranks, padding excluded), `train/step_s` (its wall seconds, data wait included) and
`train/step_end_unix_s` (when it ended, on the wall clock the caller also reads). From them:
- steady tokens/s: tokens over seconds of the steps after the first `warmup_steps` (a first step pays
  allocator warm-up and the data pipeline's first batch, which is start-up, not throughput);
- start-up: wall time from the call to the end of the first step, minus what that step's tokens take at the
  steady rate: what a fit costs before its work runs at speed (worker group, engines, reference, first batch);
- teardown: from the end of the last step to the return (weight gather, checkpoint, export).
A fit is then about startup_s + tokens / steady_tokens_per_s + teardown_s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

TOKENS, SECONDS, END = "train/num_tokens", "train/step_s", "train/step_end_unix_s"


@dataclass(frozen=True)
class FitTiming:
    num_steps: int
    num_tokens: float  # all steps
    steady_tokens_per_s: float
    startup_s: float
    teardown_s: float


def fit_timing(
    history: Sequence[dict[str, Any]], *, called_at: float, returned_at: float, warmup_steps: int = 1
) -> FitTiming:
    """The figures of the module docstring for one fit called at `called_at` and returned at `returned_at`
    (unix seconds)."""
    if len(history) <= warmup_steps:
        raise ValueError(
            f"a steady rate needs more than {warmup_steps} optimizer step(s) after the warm-up; the fit took "
            f"{len(history)}: give it more pairs"
        )
    missing = [key for key in (TOKENS, SECONDS, END) if any(key not in m for m in history)]
    if missing:
        raise ValueError(f"step metrics lack {missing} (written by psr_ray/trainer/worker.py step_metrics)")
    steady = history[warmup_steps:]
    rate = sum(m[TOKENS] for m in steady) / max(sum(m[SECONDS] for m in steady), 1e-9)
    first, last = history[0], history[-1]
    return FitTiming(
        num_steps=len(history),
        num_tokens=sum(m[TOKENS] for m in history),
        steady_tokens_per_s=rate,
        startup_s=first[END] - called_at - first[TOKENS] / rate,
        teardown_s=returned_at - last[END],
    )
