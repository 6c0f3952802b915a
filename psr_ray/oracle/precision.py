"""Pair precision: how often a step pair prefers a right step to a wrong one, by the oracle. Pure.

A pair is precise when the oracle labels its chosen step right and its rejected step wrong. The baseline is a
random pick among the same stored candidates: chosen uniformly among the non-empty candidates, rejected
uniformly among the non-empty candidates whose text differs from the chosen one (the search's own rule for a
rejectable step); its precision is computed exactly per pair, not sampled.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from psr_ray.core.stats import wilson


def random_pick_precision(candidates: Sequence[str], labels: Sequence[bool]) -> float:
    """P(chosen right and rejected wrong) for the random pick of the module docstring; 0 with no valid pick."""
    texts = [c.strip() for c in candidates]
    usable = [i for i, t in enumerate(texts) if t]
    total, precise = 0.0, 0.0
    for i in usable:
        others = [j for j in usable if texts[j] != texts[i]]
        if not others:
            continue
        total += 1
        if labels[i]:
            precise += sum(1 for j in others if not labels[j]) / len(others)
    return precise / total if total else 0.0


@dataclass(frozen=True)
class PairPrecision:
    num_pairs: int
    num_precise: int  # chosen right, rejected wrong
    num_reversed: int  # chosen wrong, rejected right
    random_pick: float  # mean random-pick precision over the same pairs' candidates

    @property
    def precision(self) -> float:
        return self.num_precise / self.num_pairs if self.num_pairs else 0.0

    @property
    def ci95(self) -> tuple[float, float]:
        return wilson(self.num_precise, self.num_pairs)

    @property
    def above_random(self) -> bool:
        """The 95% interval of the precision lies wholly above the random pick's precision."""
        return self.num_pairs > 0 and self.ci95[0] > self.random_pick

    def to_dict(self) -> dict[str, float | int | bool | list[float]]:
        return {"num_pairs": self.num_pairs, "num_precise": self.num_precise, "num_reversed": self.num_reversed,
                "precision": self.precision, "precision_ci95": list(self.ci95), "random_pick": self.random_pick,
                "above_random": self.above_random}  # fmt: skip


def pair_precision(pairs: Sequence[tuple[bool, bool, float]]) -> PairPrecision:
    """From (chosen right, rejected right, random-pick precision of its candidates) per pair."""
    n = len(pairs)
    return PairPrecision(
        num_pairs=n,
        num_precise=sum(1 for c, r, _ in pairs if c and not r),
        num_reversed=sum(1 for c, r, _ in pairs if r and not c),
        random_pick=sum(x for _, _, x in pairs) / n if n else 0.0,
    )
