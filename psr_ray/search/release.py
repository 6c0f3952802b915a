"""How long a search's step pairs wait between their step's decision and the trainer's stream (issue 25). Pure.

A pair is released when its step is committed, i.e. when its problem's next step is decided
(`psr_ray.search.problem`), and reaches the stream when the `PairWriter` flush carrying it lists it in the
manifest. `PairLedger` watches searches from outside and stamps: each pair's (latest) decision and commit,
each problem's rounds (one step's decision time is the time between two consecutive decisions of a problem), and
each flush; it counts pairs popped by roll-backs and dropped with abandoned problems (both uncommitted).
bench/search_throughput.py reports these figures.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from psr_ray.search.problem import Outcome, ProblemSearch


@dataclass
class PairLedger:
    decided: dict[str, float] = field(default_factory=dict)  # pair_id -> when its step was (last) decided
    last_round: dict[str, float] = field(default_factory=dict)  # problem_id -> its latest round's decision
    step_times: list[float] = field(default_factory=list)  # between consecutive decisions of one problem
    committed_at: dict[str, float] = field(default_factory=dict)  # pair_id -> when its step was committed
    waits: list[float] = field(default_factory=list)  # flushed pairs: flush time - decided time
    commit_waits: list[float] = field(default_factory=list)  # flushed pairs: committed time - decided time
    flushed_at: list[float] = field(default_factory=list)
    popped: int = 0  # pairs popped by roll-backs (never released)
    dropped: int = 0  # uncommitted pairs dropped with abandoned problems

    _seen: dict[str, tuple] = field(default_factory=dict)  # problem_id -> its state at the last look

    def after(self, search: ProblemSearch, now: float) -> None:
        """Looks at a search after a result was fed to it: when its state moved (a step kept, a roll-back, the
        end) a round was decided now; stamps the pairs it popped, the new pair and the pairs now committed."""
        key = search.problem.problem_id
        pairs = [p for p in search.pairs if p is not None]
        state = (tuple(id(p) for p in pairs), len(search.steps), search.num_rollbacks, search.done)
        old = self._seen.get(key, ((), 0, 0, False))  # a search not looked at yet: nothing decided
        if state == old:
            return  # candidates arrived: nothing decided yet
        if key in self.last_round:
            self.step_times.append(now - self.last_round[key])
        self.last_round[key] = now
        self.popped += len(set(old[0]) - set(state[0]))
        for index, pair in enumerate(search.pairs):
            if pair is None:
                continue
            if id(pair) not in old[0]:  # a step decided (again, after a roll-back: the same pair_id)
                self.decided[pair.pair_id] = now
            if index < search.committed or search.done:
                self.committed_at.setdefault(pair.pair_id, now)
        self._seen[key] = state

    def finish(self, search: ProblemSearch) -> None:
        """The problem is done: an abandoned one drops its uncommitted pairs."""
        if search.outcome is Outcome.ABANDONED:
            self.dropped += sum(1 for p in search.pairs[search.committed :] if p is not None)

    def flushed(self, pair_ids: list[str], now: float) -> None:
        """These pairs were listed in the manifest (the trainer's stream) at `now`."""
        for pair_id in pair_ids:
            self.waits.append(now - self.decided[pair_id])
            self.commit_waits.append(self.committed_at[pair_id] - self.decided[pair_id])
            self.flushed_at.append(now)
