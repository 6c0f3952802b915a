"""Drives many problems' step searches at once over the rollout and judge engine pools.

Every problem is a `ProblemSearch` state machine; the scheduler only moves requests, in three moves per turn:

  admit     start searches for queued problems, up to `search.max_problems_in_flight`
  dispatch  send each problem's pending `ProposeRequest` to the least-loaded rollout engine, and each pending
            judge round (all comparisons of one problem's round travel together; `judge.plan: knockout` asks
            up to 3 rounds per step, each routed back here) to the least-loaded judge, one problem per call
  collect   take every finished call (`ray.wait`) and feed its results back to the searches; a problem's
            pairs go to `on_committed` as soon as their steps are committed (the next step decided), the
            rest to `on_finished` when it is done

Engines batch continuously (engines/batching.py): a call joins the batch already running on its engine, so a
problem's next request goes out the moment its last result lands and no problem waits for a cohort.

`judge.mode: oracle` (an ablation) decides judge rounds here, without an engine, by the exact step check
of `psr_ray.oracle.judge`; proposals still go to the rollout engines. `judge.mode: likelihood` (an ablation)
sends a round's candidates to the judge engines' `score_steps` instead of comparisons to their `judge`.

Faults. A call that fails because its engine died is re-queued whole (Ray restarts the engine,
`max_restarts`); a failed call returns nothing, so each request is answered exactly once. A restarted engine
re-runs `__init__` and so serves its construction-time weights and `policy_version`: every
`Candidates`/`Judgment` carries the version, and a call answered at any version other than the iteration's
is discarded and re-queued like a failed one while that engine reloads the iteration's policy from its HF
export (`update_weights_from_path(policy_dir)`; the pool holds calls back meanwhile). Policies never mix in
a pair. Sampling seeds are per request, derived from (run seed, iteration, problem, proposals accepted so
far), so a re-queued request is sampled with the seed it first had and the pairs do not depend on batching
or on which engine answers. A problem resumed from its `Checkpoint` (`resume=`) continues with the seeds the
lost search would have used.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from psr_ray.config import JudgeMode, PSRConfig
from psr_ray.data.problems import Problem, check_unique_ids
from psr_ray.data.schema import Checkpoint, StepPair
from psr_ray.engines.api import JudgeRequest, ScoreRequest
from psr_ray.engines.pool import EnginePool
from psr_ray.runtime import metrics
from psr_ray.runtime.locate import where_is
from psr_ray.search.problem import Outcome, Phase, ProblemSearch
from psr_ray.search.stats import SearchStats

log = logging.getLogger(__name__)


class CallKind(enum.Enum):
    PROPOSE = "propose"
    JUDGE = "judge"
    RELOAD = "reload"


@dataclass(frozen=True)
class InFlightCall:
    """One engine call on its way: which pool and engine, what kind, and the problems it serves."""

    pool: EnginePool
    engine: int
    kind: CallKind
    keys: tuple[str, ...]
    sent_at: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class CommittedSteps:
    """Pairs of a problem still being searched whose steps can no longer be rolled back, and the checkpoint a
    resumed search of it starts from."""

    problem_id: str
    pairs: list[StepPair]
    checkpoint: Checkpoint


@dataclass(frozen=True)
class FinishedProblem:
    """A problem done: `pairs` are those not handed to `on_committed` before (all of them without it)."""

    problem_id: str
    outcome: Outcome
    pairs: list[StepPair]
    num_rollbacks: int


class SearchScheduler:
    """Runs `ProblemSearch`es for many problems concurrently on the given engine pools."""

    def __init__(
        self,
        cfg: PSRConfig,
        *,
        iteration: int,
        policy_version: int,
        rollout: EnginePool,
        judge: EnginePool,
        policy_dir: str | None = None,
    ):
        self.cfg = cfg
        self.iteration = iteration
        self.policy_version = policy_version
        self.policy_dir = policy_dir  # HF export of `policy_version`: what a restarted engine reloads
        self.rollout, self.judge = rollout, judge
        self.stats = SearchStats()
        self.likelihood = cfg.judge.mode == JudgeMode.LIKELIHOOD
        self._queue: deque[Problem] = deque()
        self._active: dict[str, ProblemSearch] = {}
        self._want: dict[CallKind, deque[str]] = {CallKind.PROPOSE: deque(), CallKind.JUDGE: deque()}
        self._calls: dict[Any, InFlightCall] = {}
        self._resume: dict[str, Checkpoint] = {}
        self._on_committed: Callable[[CommittedSteps], None] | None = None
        self._held: dict[str, list[StepPair]] = {}  # committed pairs, without `on_committed`

    def valid(self, problem: Problem) -> bool:
        return bool(problem.question.strip()) and len(problem.question) <= self.cfg.data.max_problem_chars

    def run(
        self,
        problems: Iterable[Problem],
        on_finished: Callable[[FinishedProblem], None],
        on_tick: Callable[[], None] | None = None,
        *,
        on_committed: Callable[[CommittedSteps], None] | None = None,
        resume: dict[str, Checkpoint] | None = None,
    ) -> SearchStats:
        """Searches every problem; `on_finished` gets each one once, as soon as it is done. `on_committed`
        gets a problem's pairs as soon as their steps are committed (without it they are held and handed to
        `on_finished` with the rest). Problems that are empty or too long are skipped and counted (callers pass
        already-finished problems filtered out); a problem in `resume` starts from its checkpoint."""
        import ray

        problems = list(problems)
        check_unique_ids(problems)
        self._resume = dict(resume or {})
        self._on_committed = on_committed
        for problem in problems:
            if self.valid(problem):
                self._queue.append(problem)
            else:
                self.stats.count("problems_skipped")
        while self._queue or self._active:
            self._admit()
            if self.cfg.judge.mode == JudgeMode.ORACLE:
                self._judge_by_oracle(on_finished)
            self._dispatch()
            if not self._calls:  # every engine is backing off after a failure
                time.sleep(0.1)
                if on_tick is not None:
                    on_tick()
                continue
            self._check_deadlines()
            ready, waiting = ray.wait(list(self._calls), num_returns=1, timeout=1.0)
            if ready and waiting:  # take every call that is done, not just the first
                ready += ray.wait(waiting, num_returns=len(waiting), timeout=0)[0]
            for ref in ready:
                for key in self._collect(ref):
                    self._route(key, on_finished)
            if on_tick is not None:
                on_tick()
        metrics.set_gauge("problems_in_flight", 0)
        return self.stats

    def _check_deadlines(self) -> None:
        """A call unanswered for `run.engine_call_timeout_s` fails the search naming its engine: a hung
        engine must end in an error, not a silent stall (a dead one fails its call and is re-queued)."""
        timeout = self.cfg.run.engine_call_timeout_s
        now = time.monotonic()
        for call in self._calls.values():
            if now - call.sent_at > timeout:
                name = call.pool.names[call.engine]
                raise TimeoutError(
                    f"{name} has not answered a {call.kind.value} call for {len(call.keys)} problems in "
                    f"{timeout:.0f} s (run.engine_call_timeout_s); is it hung? "
                    f"({where_is([name]) or 'see the Ray logs of its node'})"
                )

    # ---- admit ---------------------------------------------------------------------------------------

    def _admit(self) -> None:
        search_cfg, judge_cfg = self.cfg.search, self.cfg.judge
        while self._queue and len(self._active) < search_cfg.max_problems_in_flight:
            problem = self._queue.popleft()
            self._active[problem.problem_id] = ProblemSearch(
                problem,
                iteration=self.iteration,
                max_steps=search_cfg.max_steps,
                max_rollbacks=search_cfg.max_rollbacks,
                both_orders=judge_cfg.both_orders,
                judge_mode=judge_cfg.mode,
                min_score_margin=search_cfg.min_score_margin,
                judge_plan=judge_cfg.plan,
                resume_from=self._resume.pop(problem.problem_id, None),
            )
            self._want[CallKind.PROPOSE].append(problem.problem_id)
            self.stats.count("problems_started")
        metrics.set_gauge("problems_in_flight", len(self._active))

    def _route(self, key: str, on_finished: Callable[[FinishedProblem], None]) -> None:
        """Hands over the problem's newly committed pairs, then puts it in the queue its phase needs next, or
        hands it over when it is done."""
        search = self._active[key]
        commit = search.take_commit()
        if commit is not None:
            pairs, checkpoint = commit
            self.stats.count("pairs", len(pairs))
            if self._on_committed is None:
                self._held.setdefault(key, []).extend(pairs)
            else:
                self._on_committed(CommittedSteps(key, pairs, checkpoint))
        if search.phase is Phase.PROPOSE:
            self._want[CallKind.PROPOSE].append(key)
        elif search.phase is Phase.JUDGE:
            self._want[CallKind.JUDGE].append(key)
        else:
            self._finish(self._active.pop(key), on_finished)

    # ---- dispatch ------------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        r, j = self.cfg.rollout, self.cfg.judge
        want_propose, want_judge = self._want[CallKind.PROPOSE], self._want[CallKind.JUDGE]
        while want_propose and (engine := self.rollout.pick()) is not None:
            keys = [want_propose.popleft()]
            requests = [self._active[k].propose_request() for k in keys]
            # One seed per request (the engine seeds its sample j with seed + j): a rolled-back step proposed
            # again gets new candidates; a re-queued request or a resumed run replays the same ones.
            ref = self.rollout.actors[engine].propose.remote(
                requests,
                num_candidates=r.num_candidates,
                temperature=r.temperature,
                top_p=r.top_p,
                max_tokens=r.max_step_tokens,
                seed=[self._seed(k) for k in keys],
            )
            self._send(ref, InFlightCall(self.rollout, engine, CallKind.PROPOSE, tuple(keys)))
            self.stats.batch("propose", len(requests))
        while want_judge and (engine := self.judge.pick()) is not None:
            keys = [want_judge.popleft()]
            judging: list[JudgeRequest | ScoreRequest] = list(self._round_requests(keys[0]))
            actor = self.judge.actors[engine]
            if self.likelihood:
                ref = actor.score_steps.remote(judging)
            else:
                ref = actor.judge.remote(
                    judging, mode=j.mode, temperature=j.temperature, max_tokens=j.max_explanation_tokens
                )
            self._send(ref, InFlightCall(self.judge, engine, CallKind.JUDGE, tuple(keys)))
            self.stats.batch("judge", len(judging))

    def _round_requests(self, key: str) -> list[JudgeRequest] | list[ScoreRequest]:
        """What a problem's judge round asks the judge engines: comparisons, or candidates to score."""
        search = self._active[key]
        return search.score_requests() if self.likelihood else search.judge_requests()

    def _judge_by_oracle(self, on_finished: Callable[[FinishedProblem], None]) -> None:
        """Every waiting judge round, decided by the step oracle (judge.mode=oracle) in the driver."""
        from psr_ray.oracle.judge import oracle_round

        want_judge = self._want[CallKind.JUDGE]
        while want_judge:
            key = want_judge.popleft()
            search = self._active[key]
            judgments, all_right = oracle_round(
                search.problem, search.judge_requests(), policy_version=self.policy_version
            )
            self._take_judgments((key,), judgments, all_right=all_right)
            self._route(key, on_finished)

    def _send(self, ref: Any, call: InFlightCall) -> None:
        call.pool.started(call.engine)
        self.stats.in_flight(call.pool.in_flight[call.engine])
        self._calls[ref] = call

    def _seed(self, key: str) -> int:
        """The base seed of a problem's next proposal: the same whichever call, batch or engine carries it."""
        attempt = self._active[key].num_proposals
        text = f"{self.cfg.run.seed}/{self.iteration}/{key}/{attempt}".encode()
        return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big") % 2**31

    # ---- collect -------------------------------------------------------------------------------------

    def _collect(self, ref: Any) -> tuple[str, ...]:
        """Feeds one finished call back; returns the problems to route again (none when re-queued)."""
        import ray

        call = self._calls.pop(ref)
        try:
            results = ray.get(ref)
        except ray.exceptions.RayActorError as err:  # ActorDiedError, ActorUnavailableError
            first = call.pool.failed(
                call.engine, restarting=isinstance(err, ray.exceptions.ActorUnavailableError), reason=_first_line(err)
            )
            # One warning per outage; the re-sends to an engine Ray is restarting go to the debug log.
            (log.warning if first else log.debug)("%s engine %d failed (%s); re-queueing %d problems",
                                                  call.pool.role, call.engine, type(err).__name__, len(call.keys))  # fmt: skip
            self._requeue(call)
            return ()
        call.pool.succeeded(call.engine)
        if call.kind is CallKind.RELOAD:
            call.pool.release(call.engine)
            return ()
        stale = {x.policy_version for x in results} - {self.policy_version}
        if stale:  # a restarted engine, back on its construction-time weights: never mix policies
            self._requeue(call)
            self.stats.count("stale_results", len(call.keys))
            self._reload(call.pool, call.engine, stale)
            return ()
        if call.kind is CallKind.PROPOSE:
            self._take_candidates(call.keys, results)
        else:
            self._take_judgments(call.keys, results)
        return call.keys

    def _requeue(self, call: InFlightCall) -> None:
        self._want[call.kind].extendleft(reversed(call.keys))
        self.stats.count("requeued_requests", len(call.keys))

    def _reload(self, pool: EnginePool, engine: int, stale: set[int]) -> None:
        """Loads the iteration's policy into an engine that answered at another version; the pool sends it
        nothing until the reload returns (a call already queued on it comes back stale and is re-queued)."""
        if self.policy_dir is None:
            raise RuntimeError(
                f"{pool.role} engine {engine} answered at policy_version {sorted(stale)}, not {self.policy_version} "
                "(restarted on its construction-time weights?); pass policy_dir= so that it can be reloaded"
            )
        if not pool.hold(engine):
            return  # already reloading
        log.warning("%s engine %d is at policy_version %s, not %d: reloading %s",
                    pool.role, engine, sorted(stale), self.policy_version, self.policy_dir)  # fmt: skip
        ref = pool.actors[engine].update_weights_from_path.remote(self.policy_dir, policy_version=self.policy_version)
        self._send(ref, InFlightCall(pool, engine, CallKind.RELOAD, ()))
        self.stats.count("engine_reloads")

    def _take_candidates(self, keys: tuple[str, ...], results: list[Any]) -> None:
        if len(results) != len(keys):
            raise RuntimeError(f"a rollout engine answered {len(results)} of {len(keys)} propose requests")
        for key, candidates in zip(keys, results, strict=True):
            self._active[key].on_candidates(candidates)
            self.stats.count("candidates", len(candidates.steps))
            self.stats.count("rollout_tokens", candidates.num_tokens)

    def _take_judgments(self, keys: tuple[str, ...], results: list[Any], *, all_right: bool = False) -> None:
        sizes = [len(self._round_requests(k)) for k in keys]
        if len(results) != sum(sizes):
            raise RuntimeError(f"a judge engine answered {len(results)} of {sum(sizes)} judge requests")
        start = 0
        for key, size in zip(keys, sizes, strict=True):
            judgments = results[start : start + size]
            start += size
            self.stats.count("judge_calls", size)
            if self.likelihood:  # StepLikelihoods: no verdicts, no generated tokens
                self._active[key].on_likelihoods(judgments)
                self.stats.count("unparseable", sum(1 for x in judgments if x.num_tokens == 0))
                continue
            self._active[key].on_judgments(judgments, all_right=all_right)
            self.stats.count("unparseable", sum(1 for x in judgments if x.verdict == "unparseable"))
            self.stats.count("oracle_draws", sum(1 for x in judgments if x.verdict == "draw"))
            self.stats.count("judge_tokens", sum(x.num_tokens for x in judgments))

    def _finish(self, search: ProblemSearch, on_finished: Callable[[FinishedProblem], None]) -> None:
        assert search.outcome is not None  # set together with Phase.DONE, the only phase routed here
        pairs = search.finished_pairs()
        self.stats.count("pairs", len(pairs))
        pairs = self._held.pop(search.problem.problem_id, []) + pairs
        self.stats.count("rollbacks", search.num_rollbacks)
        self.stats.count("steps_without_pair", search.num_steps_without_pair)
        if search.outcome is Outcome.ABANDONED:
            self.stats.count("problems_abandoned")
        elif search.outcome is Outcome.FINAL_ANSWER:
            self.stats.count("problems_final_answer")
            self.stats.count("problems_correct", int(search.answer_correct() is True))
        else:
            self.stats.count("problems_max_steps")
        on_finished(FinishedProblem(search.problem.problem_id, search.outcome, pairs, search.num_rollbacks))


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
