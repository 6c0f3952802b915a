"""When a search's step pairs could be released, and what holding them costs (issue 17 section 2). Pure.

A `ProblemSearch` holds its pairs until the problem finishes (`psr_ray.search.problem`): a roll-back pops the
newest step and its pair, and an abandoned problem releases none. `PairLedger` watches searches from outside
and stamps each pair's life: when its step was decided, when it passed out of roll-back reach, and when it
was released or lost (popped by a roll-back, dropped with an abandoned problem). bench/search_throughput.py
reports these figures: the evidence for whether pairs could stream to the trainer before their problem ends.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from psr_ray.data.schema import StepPair
from psr_ray.search.problem import Outcome, ProblemSearch


def out_of_reach(num_steps: int, index: int, rollbacks_left: int) -> bool:
    """Whether the step at 0-based `index` of `num_steps` kept steps can no longer be popped: each roll-back
    pops only the newest step, so popping it takes `num_steps - index` roll-backs, more than are left. (The
    problem can still be abandoned, which drops every pair.)"""
    return num_steps - index > rollbacks_left


@dataclass
class PairLedger:
    decided: dict[str, float] = field(default_factory=dict)  # pair_id -> when its latest step was decided
    reach_left: dict[str, float] = field(default_factory=dict)  # pair_id -> when it passed out of reach
    waits: list[float] = field(default_factory=list)  # released pairs: release time - decided time
    early: list[float] = field(default_factory=list)  # released pairs out of reach first: release - that time
    released_at: list[float] = field(default_factory=list)
    popped: int = 0  # pairs popped by roll-backs (never released)
    dropped: int = 0  # pairs dropped with abandoned problems

    @staticmethod
    def snapshot(search: ProblemSearch) -> list[StepPair]:
        """The search's pairs before it is fed a judge round (pass to `after`)."""
        return [p for p in search.pairs if p is not None]

    def after(self, search: ProblemSearch, before: list[StepPair], now: float) -> None:
        """Stamps what one judge round changed: pairs popped, a new pair decided, pairs now out of reach."""
        kept = {id(p) for p in search.pairs if p is not None}
        self.popped += sum(1 for p in before if id(p) not in kept)
        old = {id(p) for p in before}
        left = search.max_rollbacks - search.num_rollbacks
        for index, pair in enumerate(search.pairs):
            if pair is None:
                continue
            if id(pair) not in old:  # a step decided (again, after a roll-back: the same pair_id)
                self.decided[pair.pair_id] = now
                self.reach_left.pop(pair.pair_id, None)
            if out_of_reach(len(search.pairs), index, left):
                self.reach_left.setdefault(pair.pair_id, now)

    def finish(self, search: ProblemSearch, now: float) -> None:
        """The problem is done: its pairs are released now, or dropped when it was abandoned."""
        pairs = [p for p in search.pairs if p is not None]
        if search.outcome is Outcome.ABANDONED:
            self.dropped += len(pairs)
            return
        for pair in pairs:
            self.waits.append(now - self.decided[pair.pair_id])
            self.released_at.append(now)
            if pair.pair_id in self.reach_left:
                self.early.append(now - self.reach_left[pair.pair_id])
