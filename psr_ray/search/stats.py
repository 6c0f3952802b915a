"""Counters of a search pass and the summary `generate_pairs` returns.

`SearchStats.count(field, n)` is the one way to count: it adds to the field and to the Ray metric of the
same meaning (`psr_ray.runtime.metrics`), so the dashboard and the summary cannot disagree.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from psr_ray.runtime import metrics

# Stats fields whose Ray metric has another name; a field not here and not in metrics.INSTRUMENTS has none.
_METRIC_OF = {
    "unparseable": "unparseable_verdicts",
    "rollout_tokens": "generated_tokens",
    "judge_tokens": "generated_tokens",
    "problems_final_answer": "problems_finished",
    "problems_max_steps": "problems_finished",
}
# Tags of those metrics that declare some (metrics.INSTRUMENTS): tokens are counted per engine role.
_TAGS_OF = {"rollout_tokens": {"role": "rollout"}, "judge_tokens": {"role": "judge"}}


@dataclass
class SearchStats:
    problems_total: int = 0
    problems_started: int = 0
    problems_resumed: int = 0  # finished by an earlier run of this iteration: skipped, not redone
    problems_skipped: int = 0  # empty or over data.max_problem_chars
    problems_final_answer: int = 0
    problems_max_steps: int = 0
    problems_abandoned: int = 0
    problems_correct: int = 0  # final answers verified against a reference
    pairs: int = 0
    rollbacks: int = 0
    steps_without_pair: int = 0  # steps kept without a pair: every non-empty candidate the same text
    candidates: int = 0
    judge_calls: int = 0  # comparisons judged (judge.mode=likelihood: candidates scored)
    unparseable: int = 0  # verdicts not parsed (judge.mode=likelihood: candidates the engine could not score)
    oracle_draws: int = 0  # judge.mode=oracle: comparisons of two right or two wrong steps
    rollout_tokens: int = 0
    judge_tokens: int = 0
    requeued_requests: int = 0
    # Engine calls sent, the requests they carried and the largest one (judge requests = comparisons).
    propose_batches: int = 0
    propose_requests: int = 0
    largest_propose_batch: int = 0
    judge_batches: int = 0
    judge_requests: int = 0
    largest_judge_batch: int = 0
    # The most calls of one kind one engine held at once: its running batch served them together.
    most_calls_on_an_engine: int = 0
    stale_results: int = 0  # requests answered by an engine at another policy_version: discarded, re-queued
    engine_reloads: int = 0  # engines reloaded from policy_dir after coming back on other weights

    def count(self, name: str, n: int = 1) -> None:
        """Adds `n` to the field `name` and to its Ray metric."""
        setattr(self, name, getattr(self, name) + n)
        metric = _METRIC_OF.get(name, name)
        if metric in metrics.INSTRUMENTS:
            metrics.inc(metric, n, **_TAGS_OF.get(name, {}))

    def batch(self, kind: str, size: int) -> None:
        """One engine call of `kind` ("propose" or "judge") carrying `size` requests."""
        self.count(f"{kind}_batches")
        self.count(f"{kind}_requests", size)
        largest = f"largest_{kind}_batch"
        setattr(self, largest, max(getattr(self, largest), size))

    def in_flight(self, calls: int) -> None:
        """An engine now holds `calls` calls of one kind."""
        self.most_calls_on_an_engine = max(self.most_calls_on_an_engine, calls)

    @property
    def problems_done(self) -> int:
        return self.problems_final_answer + self.problems_max_steps


def margin_summary(margins: list[float]) -> dict[str, float | None]:
    """Min, quartiles (linear interpolation between order statistics) and max of `margins`; None when empty."""
    ordered = sorted(margins)

    def quantile(q: float) -> float | None:
        if not ordered:
            return None
        position = q * (len(ordered) - 1)
        low = int(position)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (position - low)

    names = ("margin_min", "margin_q1", "margin_median", "margin_q3", "margin_max")
    return {name: quantile(q) for name, q in zip(names, (0.0, 0.25, 0.5, 0.75, 1.0), strict=True)}


@dataclass
class SearchSummary(SearchStats):
    """A finished search pass: its counters plus what is derived from them."""

    iteration: int = 0
    pairs_total: int = 0  # committed for the iteration, earlier (resumed) runs included
    seconds: float = 0.0
    pairs_dir: str = ""
    # The distribution of the committed pairs' margins (chosen_score - rejected_score); None without pairs.
    margin_min: float | None = None
    margin_q1: float | None = None
    margin_median: float | None = None
    margin_q3: float | None = None
    margin_max: float | None = None

    @classmethod
    def of(cls, stats: SearchStats, **fields: Any) -> SearchSummary:
        return cls(**dataclasses.asdict(stats), **fields)

    @property
    def unparseable_rate(self) -> float:
        return self.unparseable / self.judge_calls if self.judge_calls else 0.0

    @property
    def generated_tokens(self) -> int:
        return self.rollout_tokens + self.judge_tokens

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def mean_propose_batch(self) -> float:
        return self.propose_requests / self.propose_batches if self.propose_batches else 0.0

    @property
    def mean_judge_batch(self) -> float:
        return self.judge_requests / self.judge_batches if self.judge_batches else 0.0

    def to_dict(self) -> dict[str, Any]:
        derived = ("problems_done", "unparseable_rate", "generated_tokens", "tokens_per_s", "mean_propose_batch",
                   "mean_judge_batch")  # fmt: skip
        return dataclasses.asdict(self) | {name: getattr(self, name) for name in derived}
