"""Drives many problems' step searches at once over the rollout and judge actor pools.

Every problem is a `ProblemSearch` state machine; the scheduler only moves requests. Pending
`ProposeRequest`s of all problems are batched to the least-loaded rollout actor and pending judge rounds
(all comparisons of one problem's step travel together) to the least-loaded judge actor; `ray.wait` on the
in-flight calls feeds results back. Each actor gets at most `MAX_CALLS_PER_ACTOR` calls at a time and a
batch at most 1/(that x pool size) of the problems in flight, so while one cohort is judged the next is
proposed and both pools stay busy with large batches.

Faults. A call that fails because its actor died is re-queued whole (Ray restarts the actor, `max_restarts`);
a failed call returns nothing, so each request is answered exactly once. A restarted engine re-runs
`__init__` and so serves its construction-time weights and `policy_version`: every `Candidates`/`Judgment`
carries the version, and a call answered at any version other than the iteration's is discarded and
re-queued like a failed one while that engine reloads the iteration's policy from its HF export
(`update_weights_from_path(policy_dir)`, no calls are sent to it meanwhile). Policies never mix in a pair.
Sampling seeds are per request, derived from (run seed, iteration, problem, proposals accepted so far),
so a re-queued request is sampled with the seed it first had and the pairs do not depend on batching or
on which engine answers. Finished problems go to the `PairWriter` (exactly once, resumable) and thus to
the streaming dataset of `psr_ray.data.pairs_io`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from psr_ray import metrics
from psr_ray.config import PSRConfig
from psr_ray.data.pairs_io import PairWriter
from psr_ray.data.schema import StepPair
from psr_ray.search import Outcome, Phase, Problem, ProblemSearch

log = logging.getLogger(__name__)

MAX_CALLS_PER_ACTOR = 2


@dataclass
class SearchStats:
    problems_total: int = 0
    problems_resumed: int = 0  # finished by an earlier run of this iteration: skipped, not redone
    problems_skipped: int = 0  # empty or over data.max_problem_chars
    problems_final_answer: int = 0
    problems_max_steps: int = 0
    problems_abandoned: int = 0
    problems_correct: int = 0  # final answers verified against a reference
    pairs: int = 0
    rollbacks: int = 0
    candidates: int = 0
    judge_calls: int = 0
    unparseable: int = 0
    rollout_tokens: int = 0
    judge_tokens: int = 0
    requeued_requests: int = 0
    propose_batches: list[int] = field(default_factory=list)
    judge_batches: list[int] = field(default_factory=list)  # judge requests per call
    stale_results: int = 0  # requests answered by an engine at another policy_version: discarded, re-queued
    engine_reloads: int = 0  # engines reloaded from policy_dir after coming back on other weights


@dataclass(frozen=True)
class FinishedProblem:
    problem_id: str
    outcome: Outcome
    pairs: list[StepPair]
    num_rollbacks: int


@dataclass(frozen=True)
class GenerateSummary:
    iteration: int
    pairs: int  # made by this run
    pairs_total: int  # committed for the iteration, earlier (resumed) runs included
    problems: int
    problems_done: int
    problems_resumed: int
    problems_skipped: int
    problems_abandoned: int
    problems_final_answer: int
    rollbacks: int
    candidates: int
    judge_calls: int
    unparseable_rate: float
    generated_tokens: int
    tokens_per_s: float
    seconds: float
    mean_propose_batch: float
    mean_judge_batch: float
    requeued_requests: int
    stale_results: int
    engine_reloads: int
    pairs_dir: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Pool:
    """Actor handles with their in-flight call counts; dead-for-good actors are dropped."""

    def __init__(self, name: str, actors: list[Any], max_restarts: int):
        if not actors:
            raise ValueError(f"no {name} workers given; create them with create_{name}_workers(cfg, model_path)")
        self.name = name
        self.actors = list(actors)
        self.in_flight = [0] * len(actors)
        self.failures = [0] * len(actors)
        self.not_before = [0.0] * len(actors)
        self.max_failures = max_restarts + 1

    def pick(self) -> int | None:
        now = time.monotonic()
        free = [
            i
            for i in range(len(self.actors))
            if self.in_flight[i] < MAX_CALLS_PER_ACTOR
            and self.failures[i] < self.max_failures
            and self.not_before[i] <= now
        ]
        return min(free, key=lambda i: (self.in_flight[i], i)) if free else None

    def succeeded(self, i: int) -> None:
        self.in_flight[i] -= 1
        self.failures[i] = 0

    def failed(self, i: int, *, restarting: bool = False) -> None:
        """A call lost to a dead actor. `restarting` (ActorUnavailableError): Ray is already restarting it,
        which takes as long as an engine start; that is waited out, not counted as another death."""
        self.in_flight[i] -= 1
        if restarting:
            self.not_before[i] = time.monotonic() + 1.0
            return
        self.failures[i] += 1
        self.not_before[i] = time.monotonic() + 0.5 * self.failures[i]  # let Ray restart it
        if all(f >= self.max_failures for f in self.failures):
            raise RuntimeError(f"every {self.name} worker died {self.max_failures} times in a row; see their logs")


class SearchScheduler:
    """Runs `ProblemSearch`es for many problems concurrently on the given actor pools."""

    def __init__(
        self,
        cfg: PSRConfig,
        *,
        iteration: int,
        policy_version: int,
        rollout_workers,
        judge_workers,
        policy_dir: str | None = None,
    ):
        self.cfg = cfg
        self.iteration = iteration
        self.policy_version = policy_version
        self.policy_dir = policy_dir  # HF export of `policy_version`: what a restarted engine reloads
        self.rollout = _Pool("rollout", rollout_workers, cfg.rollout.max_restarts)
        self.judge = _Pool("judge", judge_workers, cfg.judge.max_restarts)
        self.stats = SearchStats()
        in_flight = cfg.search.max_problems_in_flight
        self.max_propose_batch = max(1, math.ceil(in_flight / (MAX_CALLS_PER_ACTOR * len(self.rollout.actors))))
        n = cfg.rollout.num_candidates
        comparisons = n * (n - 1) // (1 if cfg.judge.both_orders else 2)
        self.max_judge_batch = max(
            1, math.ceil(in_flight * comparisons / (MAX_CALLS_PER_ACTOR * len(self.judge.actors)))
        )
        self._num_proposals: dict[str, int] = {}  # accepted proposals per problem: the seed's attempt number

    def valid(self, problem: Problem) -> bool:
        return bool(problem.question.strip()) and len(problem.question) <= self.cfg.data.max_problem_chars

    def run(
        self,
        problems: Iterable[Problem],
        on_finished: Callable[[FinishedProblem], None],
        on_tick: Callable[[], None] | None = None,
    ) -> SearchStats:
        """Searches every problem; `on_finished` gets each one once, as soon as it is done. Problems that
        are empty or too long are skipped and counted (callers pass already-resumed problems filtered out)."""
        import ray

        queue: deque[Problem] = deque()
        seen: set[str] = set()
        for problem in problems:
            if problem.problem_id in seen:
                raise ValueError(f"problem_id {problem.problem_id!r} appears twice; ids must be unique")
            seen.add(problem.problem_id)
            if self.valid(problem):
                queue.append(problem)
            else:
                self.stats.problems_skipped += 1
                metrics.inc("problems_skipped")
        active: dict[str, ProblemSearch] = {}
        want_propose: deque[str] = deque()
        want_judge: deque[str] = deque()
        in_flight: dict[Any, tuple[_Pool, int, str, list[str]]] = {}
        search_cfg, judge_cfg = self.cfg.search, self.cfg.judge

        def route(key: str) -> None:
            search = active[key]
            if search.phase is Phase.PROPOSE:
                want_propose.append(key)
            elif search.phase is Phase.JUDGE:
                want_judge.append(key)
            else:
                self._finish(active.pop(key), on_finished)

        while queue or active:
            while queue and len(active) < search_cfg.max_problems_in_flight:
                problem = queue.popleft()
                active[problem.problem_id] = ProblemSearch(
                    problem,
                    iteration=self.iteration,
                    num_candidates=self.cfg.rollout.num_candidates,
                    max_steps=search_cfg.max_steps,
                    max_rollbacks=search_cfg.max_rollbacks,
                    both_orders=judge_cfg.both_orders,
                    judge_mode=judge_cfg.mode,
                )
                want_propose.append(problem.problem_id)
                metrics.inc("problems_started")
            metrics.set_gauge("problems_in_flight", len(active))
            self._dispatch(active, want_propose, want_judge, in_flight)
            if not in_flight:  # every actor is backing off after a failure
                time.sleep(0.1)
                continue
            ready, waiting = ray.wait(list(in_flight), num_returns=1, timeout=1.0)
            if ready and waiting:  # take every call that is done, not just the first
                ready += ray.wait(waiting, num_returns=len(waiting), timeout=0)[0]
            for ref in ready:
                pool, actor, kind, keys = in_flight.pop(ref)
                requeue = (want_propose if kind == "propose" else want_judge).extendleft
                try:
                    results = ray.get(ref)
                except ray.exceptions.RayActorError as err:  # ActorDiedError, ActorUnavailableError
                    name = type(err).__name__
                    log.warning("%s worker %d failed (%s); re-queueing %d problems", pool.name, actor, name, len(keys))
                    pool.failed(actor, restarting=isinstance(err, ray.exceptions.ActorUnavailableError))
                    requeue(reversed(keys))
                    self.stats.requeued_requests += len(keys)
                    metrics.inc("requeued_requests", len(keys))
                    continue
                pool.succeeded(actor)
                if kind == "reload":
                    pool.not_before[actor] = 0.0
                    continue
                stale = {x.policy_version for x in results} - {self.policy_version}
                if stale:  # a restarted engine, back on its construction-time weights: never mix policies
                    requeue(reversed(keys))
                    self.stats.stale_results += len(keys)
                    self.stats.requeued_requests += len(keys)
                    metrics.inc("requeued_requests", len(keys))
                    self._reload(pool, actor, stale, in_flight)
                    continue
                if kind == "propose":
                    self._take_candidates(active, keys, results)
                else:
                    self._take_judgments(active, keys, results)
                for key in keys:
                    route(key)
            if on_tick is not None:
                on_tick()
        metrics.set_gauge("problems_in_flight", 0)
        return self.stats

    def _reload(self, pool: _Pool, actor: int, stale: set[int], in_flight: dict) -> None:
        """Loads the iteration's policy into an engine that answered at another version; no call goes to it
        until the reload returns (a call already queued on it comes back stale and is re-queued too)."""
        if pool.not_before[actor] == math.inf:
            return  # already reloading
        if self.policy_dir is None:
            raise RuntimeError(
                f"{pool.name} worker {actor} answered at policy_version {sorted(stale)}, not {self.policy_version} "
                "(restarted on its construction-time weights?); pass policy_dir= so that it can be reloaded"
            )
        log.warning(
            "%s worker %d is at policy_version %s, not %d: reloading %s",
            pool.name, actor, sorted(stale), self.policy_version, self.policy_dir,
        )  # fmt: skip
        ref = pool.actors[actor].update_weights_from_path.remote(self.policy_dir, policy_version=self.policy_version)
        pool.in_flight[actor] += 1
        pool.not_before[actor] = math.inf
        in_flight[ref] = (pool, actor, "reload", [])
        self.stats.engine_reloads += 1
        metrics.inc("engine_reloads")

    def _seed(self, key: str) -> int:
        """The base seed of a problem's next proposal: the same whichever call, batch or engine carries it."""
        attempt = self._num_proposals.get(key, 0)
        text = f"{self.cfg.run.seed}/{self.iteration}/{key}/{attempt}".encode()
        return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big") % 2**31

    def _dispatch(self, active, want_propose: deque, want_judge: deque, in_flight: dict) -> None:
        r, j = self.cfg.rollout, self.cfg.judge
        while want_propose and (actor := self.rollout.pick()) is not None:
            keys = [want_propose.popleft() for _ in range(min(self.max_propose_batch, len(want_propose)))]
            requests = [active[k].propose_request() for k in keys]
            # One seed per request (the engine seeds its sample j with seed + j): a rolled-back step proposed
            # again gets new candidates; a re-queued request or a resumed run replays the same ones.
            seed = [self._seed(k) for k in keys]
            ref = self.rollout.actors[actor].propose.remote(
                requests,
                num_candidates=r.num_candidates,
                temperature=r.temperature,
                top_p=r.top_p,
                max_tokens=r.max_step_tokens,
                seed=seed,
            )
            self.rollout.in_flight[actor] += 1
            in_flight[ref] = (self.rollout, actor, "propose", keys)
            self.stats.propose_batches.append(len(requests))
        while want_judge and (actor := self.judge.pick()) is not None:
            keys, requests = [], []
            while want_judge and (
                not keys or len(requests) + len(active[want_judge[0]].judge_requests()) <= self.max_judge_batch
            ):
                key = want_judge.popleft()
                keys.append(key)
                requests += active[key].judge_requests()
            ref = self.judge.actors[actor].judge.remote(
                requests, mode=j.mode, temperature=j.temperature, max_tokens=j.max_explanation_tokens
            )
            self.judge.in_flight[actor] += 1
            in_flight[ref] = (self.judge, actor, "judge", keys)
            self.stats.judge_batches.append(len(requests))

    def _take_candidates(self, active, keys: list[str], results) -> None:
        if len(results) != len(keys):
            raise RuntimeError(f"a rollout worker answered {len(results)} of {len(keys)} propose requests")
        for key, candidates in zip(keys, results, strict=True):
            self._num_proposals[key] = self._num_proposals.get(key, 0) + 1
            active[key].on_candidates(candidates)
            self.stats.candidates += len(candidates.steps)
            self.stats.rollout_tokens += candidates.num_tokens
            metrics.inc("candidates", len(candidates.steps))
            metrics.inc("generated_tokens", candidates.num_tokens)

    def _take_judgments(self, active, keys: list[str], results) -> None:
        sizes = [len(active[k].judge_requests()) for k in keys]
        if len(results) != sum(sizes):
            raise RuntimeError(f"a judge worker answered {len(results)} of {sum(sizes)} judge requests")
        start = 0
        for key, size in zip(keys, sizes, strict=True):
            judgments = results[start : start + size]
            start += size
            active[key].on_judgments(judgments)
            unparseable = sum(1 for x in judgments if x.verdict not in ("A", "B"))
            tokens = sum(x.num_tokens for x in judgments)
            self.stats.judge_calls += size
            self.stats.unparseable += unparseable
            self.stats.judge_tokens += tokens
            metrics.inc("judge_calls", size)
            metrics.inc("unparseable_verdicts", unparseable)
            metrics.inc("generated_tokens", tokens)

    def _finish(self, search: ProblemSearch, on_finished: Callable[[FinishedProblem], None]) -> None:
        pairs = search.finished_pairs()
        s = self.stats
        s.rollbacks += search.num_rollbacks
        s.pairs += len(pairs)
        metrics.inc("rollbacks", search.num_rollbacks)
        metrics.inc("pairs", len(pairs))
        if search.outcome is Outcome.ABANDONED:
            s.problems_abandoned += 1
            metrics.inc("problems_abandoned")
        else:
            metrics.inc("problems_finished")
            if search.outcome is Outcome.FINAL_ANSWER:
                s.problems_final_answer += 1
                s.problems_correct += int(search.answer_correct() is True)
            else:
                s.problems_max_steps += 1
        on_finished(FinishedProblem(search.problem.problem_id, search.outcome, pairs, search.num_rollbacks))


def generate_pairs(
    cfg: PSRConfig,
    problems: Iterable[Any],
    *,
    iteration: int,
    policy_version: int,
    rollout_workers: list[Any],
    judge_workers: list[Any],
    output_dir: str,
    policy_dir: str | None = None,
    on_pairs: Callable[[FinishedProblem], None] | None = None,
    flush_pairs: int = 64,
) -> GenerateSummary:
    """Searches `problems` (`search.Problem`, `data.problems.Problem` or dicts) and writes their step pairs to
    `<output_dir>/pairs/iter_<iteration>/` as they finish (readable meanwhile with `stream_pairs_dataset`).
    Problems an earlier run of this iteration finished are skipped (resume). `policy_dir` (the HF folder of
    `policy_version`) is what an engine that comes back from a crash on other weights reloads; without it
    such an engine fails the run. `on_pairs` sees each finished problem after its pairs are buffered."""
    from tqdm import tqdm

    problems = [Problem.coerce(p) for p in problems]
    ids = [p.problem_id for p in problems]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"problem_id {dup!r} appears twice; problem ids must be unique within an iteration")
    start = time.monotonic()
    writer = PairWriter(output_dir, iteration, flush_pairs=flush_pairs)
    todo = [p for p in problems if p.problem_id not in writer.done_problems]
    scheduler = SearchScheduler(
        cfg,
        iteration=iteration,
        policy_version=policy_version,
        rollout_workers=rollout_workers,
        judge_workers=judge_workers,
        policy_dir=policy_dir,
    )
    scheduler.stats.problems_total = len(problems)
    scheduler.stats.problems_resumed = len(problems) - len(todo)
    progress = tqdm(
        total=len(problems),
        initial=len(problems) - len(todo),
        desc=f"iter {iteration} problems",
        unit="problem",
        mininterval=2.0,
    )

    def finished(result: FinishedProblem) -> None:
        writer.add(result.problem_id, result.pairs)
        progress.update(1)
        progress.set_postfix(pairs=scheduler.stats.pairs, rollbacks=scheduler.stats.rollbacks, refresh=False)
        if on_pairs is not None:
            on_pairs(result)

    try:
        stats = scheduler.run(todo, finished, on_tick=writer.maybe_flush)
        progress.update(stats.problems_skipped)
        writer.close(complete=True)
    except BaseException as err:
        writer.fail(f"{type(err).__name__}: {err}")
        raise
    finally:
        progress.close()
    seconds = time.monotonic() - start
    tokens = stats.rollout_tokens + stats.judge_tokens
    return GenerateSummary(
        iteration=iteration,
        pairs=stats.pairs,
        pairs_total=writer.num_pairs,
        problems=len(problems),
        problems_done=stats.problems_final_answer + stats.problems_max_steps,
        problems_resumed=stats.problems_resumed,
        problems_skipped=stats.problems_skipped,
        problems_abandoned=stats.problems_abandoned,
        problems_final_answer=stats.problems_final_answer,
        rollbacks=stats.rollbacks,
        candidates=stats.candidates,
        judge_calls=stats.judge_calls,
        unparseable_rate=stats.unparseable / stats.judge_calls if stats.judge_calls else 0.0,
        generated_tokens=tokens,
        tokens_per_s=tokens / seconds if seconds > 0 else 0.0,
        seconds=seconds,
        mean_propose_batch=_mean(stats.propose_batches),
        mean_judge_batch=_mean(stats.judge_batches),
        requeued_requests=stats.requeued_requests,
        stale_results=stats.stale_results,
        engine_reloads=stats.engine_reloads,
        pairs_dir=str(writer.directory),
    )


def _mean(values: list[int]) -> float:
    return sum(values) / len(values) if values else 0.0
