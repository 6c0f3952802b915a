"""One search pass: search problems on the engine pools and write their step pairs exactly once."""

from __future__ import annotations

import _thread
import concurrent.futures
import threading
import time
from collections.abc import Callable, Iterable

from psr_ray.config import PSRConfig
from psr_ray.data.pairs_io import PairWriter, read_pairs
from psr_ray.data.problems import Problem, check_unique_ids
from psr_ray.engines.pool import EnginePool
from psr_ray.search.scheduler import CommittedSteps, FinishedProblem, SearchScheduler
from psr_ray.search.stats import SearchSummary, margin_summary


class SearchStopped(RuntimeError):
    """The caller asked the search to stop (its trainer failed); what finished is committed."""


def generate_pairs(
    cfg: PSRConfig,
    problems: Iterable[Problem],
    *,
    iteration: int,
    policy_version: int,
    rollout: EnginePool,
    judge: EnginePool,
    output_dir: str,
    policy_dir: str | None = None,
    on_pairs: Callable[[FinishedProblem], None] | None = None,
    flush_pairs: int | None = None,
    stop: threading.Event | None = None,
    on_turn: Callable[[], None] | None = None,
) -> SearchSummary:
    """Searches `problems` and writes their step pairs to `<output_dir>/pairs/iter_<iteration>/` as their
    steps are committed (readable meanwhile with `stream_pairs_dataset`). Problems an earlier run of this
    iteration finished are skipped, and those it left half-searched continue from their checkpoint (resume).
    `policy_dir` (the HF folder of `policy_version`) is what an engine that comes back from a crash on other
    weights reloads; without it such an engine fails the run. `on_pairs` sees each finished problem after its
    pairs are buffered. Setting `stop` ends the search within a turn with `SearchStopped` (finished problems
    committed). `on_turn` runs between scheduling turns (the run's `psr-ray scale` requests:
    pipeline/elastic.py). Parts hold `flush_pairs` pairs (default `search.flush_pairs`)."""
    from tqdm import tqdm

    problems = list(problems)
    check_unique_ids(problems)
    start = time.monotonic()
    writer = PairWriter(output_dir, iteration, flush_pairs=flush_pairs or cfg.search.flush_pairs)
    todo = [p for p in problems if p.problem_id not in writer.done_problems]
    scheduler = SearchScheduler(
        cfg, iteration=iteration, policy_version=policy_version, rollout=rollout, judge=judge, policy_dir=policy_dir
    )
    stats = scheduler.stats
    stats.problems_total = len(problems)
    stats.problems_resumed = len(problems) - len(todo)
    progress = tqdm(total=len(problems), initial=stats.problems_resumed, desc=f"iter {iteration} problems",
                    unit="problem", mininterval=2.0)  # fmt: skip

    def finished(result: FinishedProblem) -> None:
        writer.add(result.problem_id, result.pairs)
        progress.update(1)
        progress.set_postfix(pairs=stats.pairs, rollbacks=stats.rollbacks, refresh=False)
        if on_pairs is not None:
            on_pairs(result)

    def committed(result: CommittedSteps) -> None:
        writer.commit(result.problem_id, result.pairs, result.checkpoint)
        progress.set_postfix(pairs=stats.pairs, rollbacks=stats.rollbacks, refresh=False)

    def tick() -> None:
        writer.maybe_flush()
        if on_turn is not None:
            on_turn()
        if stop is not None and stop.is_set():
            raise SearchStopped(
                f"iteration {iteration}'s search was stopped after {len(writer.done_problems)} problems"
            )

    try:
        scheduler.run(todo, finished, tick, on_committed=committed, resume=writer.open_problems)
        progress.update(stats.problems_skipped)
        writer.close(complete=True)
    except BaseException as err:
        writer.fail(f"{type(err).__name__}: {err}")
        raise
    finally:
        progress.close()
    margins = read_pairs(output_dir, iteration).column("margin").to_pylist()  # every committed pair, resumed too
    return SearchSummary.of(stats, iteration=iteration, pairs_total=writer.num_pairs,
                            seconds=time.monotonic() - start, pairs_dir=str(writer.directory),
                            **margin_summary(margins))  # fmt: skip


def raise_search_cause(k: int, search: concurrent.futures.Future, *, policy_version: int) -> None:
    """After a trainer error: the search's own failure, or its zero pairs, is the cause to report."""
    from psr_ray.pipeline.run_dir import check_search_pairs

    error = search.exception()  # returns soon: the search stops at its next turn
    if error is None:
        check_search_pairs(k, search.result().to_dict(), policy_version=policy_version)
    elif not isinstance(error, SearchStopped):
        raise error


def stop_fit_on_failure(search: concurrent.futures.Future, fitting: threading.Event) -> None:
    """A done-callback of the search: when it failed while the main thread is in the trainer's fit (`fitting`),
    interrupt that fit as Ctrl-C does (Ray Train's handler aborts its run), so the run fails with the search's
    error at once. Left alone, the trainer's workers would fail on the stream's error and Ray Train would
    restart them `trainer.max_failures` times before giving up."""
    error = search.exception()
    if error is not None and not isinstance(error, SearchStopped) and fitting.is_set():
        _thread.interrupt_main()
