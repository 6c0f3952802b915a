"""The PSR driver loop, top to bottom.

With `init.run_first` the configured model is M0 and the run first initializes it into M1 (IFT + EFT SFT,
cached: psr_ray.pipeline.init_cache); otherwise the configured model is M1 (policy version 1). Iteration k = 1..K:

  1. search   M_k proposes candidate steps and judges them pairwise; pairs stream to Parquet
  2. train    step-DPO of M_{k+1} against the frozen reference M_k, consuming that stream as it grows
  3. sync     the trainer's rank 0 pushes M_{k+1} into every rollout and judge engine in place at the end of
              training (weight_sync.push, through the sender built here); the sync stage checks that every
              engine serves it, reloading any that does not from the export
  4. eval     greedy accuracy of M_{k+1} on the benchmarks (M1 is evaluated first, as iteration 0), its
              judge accuracy on held-out oracle-labelled pairs, and the pair precision of iteration k's pairs

Every finished stage is recorded in `<output_dir>/state.json` (psr_ray.pipeline.run_state), so `psr-ray run --resume`
continues a killed run from its last finished stage. Results go to `<output_dir>/results.{json,md}`,
`accuracy.png` and wandb.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from psr_ray.config import JudgeMode, PSRConfig, UserError
from psr_ray.engines.pool import EnginePool
from psr_ray.pipeline.run_dir import check_resume, check_search_pairs, stored_config
from psr_ray.pipeline.run_state import RunState, check_trained_pairs
from psr_ray.pipeline.session import RunSession
from psr_ray.runtime import kill_windows

FIRST_POLICY_VERSION = 1


@dataclasses.dataclass
class Driver:
    """What the driver holds across stages: the engine pools, the problems, the served policy, the results."""

    cfg: PSRConfig
    out: Path
    state: RunState
    session: RunSession  # holds the run folder's lock
    rollout: EnginePool
    judge: EnginePool
    tokenizer: Any
    problems: list[Any]
    policy_dir: str
    policy_version: int
    logger: Any
    rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    init: Any = None  # the InitResult when the run initialized first
    m0: dict[str, Any] | None = None  # M0's scores then (benchmark rows, judge accuracy)
    heldout_pairs: list[Any] = dataclasses.field(default_factory=list)  # judge-accuracy pairs (LabelledPair)
    elastic: Any = None  # `psr-ray scale` (pipeline/elastic.py), applied between the search's turns

    @property
    def engines(self) -> list[Any]:
        """Every engine actor handle, rollout first, each once (a judge may run on the rollout engines)."""
        return self.rollout.actors + [a for a in self.judge.actors if a not in self.rollout.actors]

    @property
    def engine_names(self) -> list[str]:
        return self.rollout.names + [n for n in self.judge.names if n not in self.rollout.names]


def run(cfg: PSRConfig, *, resume_dir: str | None = None) -> Driver:
    """Runs (or resumes) all iterations. The returned `Driver` holds the results rows and the engine handles:
    the engines live as long as it does (they are the driver's actors, not detached)."""
    from psr_ray.runtime import console, metrics
    from psr_ray.runtime.node_memory import RunMemory

    memory = RunMemory()  # each stage's peak (this node's run processes; on a cluster every node's) to state.json
    try:
        psr = _start(cfg, resume_dir)
    except BaseException:
        memory.stop()
        raise
    memory.watch_nodes(joined=bool(psr.cfg.run.ray_address))

    def record(title: str) -> None:
        psr.state.record_peak(title, *memory.take())

    record("start (init, engines)")
    cfg = psr.cfg
    total = cfg.run.num_iterations

    def stage(title: str, work: Callable[[], None]) -> None:
        with console.stage(title):
            work()
        record(title)

    try:  # one display per stage (psr_ray.runtime.console), one summary line per iteration
        metrics.set_gauge("iteration", 0)
        stage("starting model: eval", functools.partial(_evaluate, psr, iteration=0))
        print(console.iteration_summary(0, total, _stages(psr, 0), []), flush=True)
        for k in range(1, total + 1):
            metrics.set_gauge("iteration", k)
            stage(f"iter {k}/{total} search+train", functools.partial(_search_and_train, psr, k))
            stage(f"iter {k}/{total} sync", functools.partial(_sync, psr, k))
            stage(f"iter {k}/{total} eval", functools.partial(_evaluate, psr, iteration=k))
            print(console.iteration_summary(k, total, _stages(psr, k), _stages(psr, k - 1).get("eval", {}).get("rows", [])),
                  flush=True)  # fmt: skip
        psr.state.flush()  # the last stage's peak
        _write_results(psr)
    finally:
        memory.stop()
        psr.logger.finish()
        psr.session.release()
    print(f"\nResults ({psr.out / 'results.md'}):\n")
    print((psr.out / "results.md").read_text())
    return psr


def _start(cfg: PSRConfig, resume_dir: str | None) -> Driver:
    """Checks, locks the run folder, starts Ray and the engines; only then is state.json written, so a run
    that fails to start leaves nothing that blocks the corrected one."""
    out = Path(resume_dir or cfg.run.output_dir).expanduser()
    if resume_dir is not None:
        check_resume(stored_config(resume_dir), cfg, resume_dir)
    session = RunSession.locked(cfg, out)  # a second driver on this folder fails here
    try:
        return _start_locked(session, out, resuming=resume_dir is not None)
    except BaseException:
        session.release()
        raise


def _start_locked(session: RunSession, out: Path, *, resuming: bool) -> Driver:
    from psr_ray.pipeline.elastic import scaled_counts, start_elastic, start_pools
    from psr_ray.pipeline.init_cache import init_for_run
    from psr_ray.runtime.metrics import WandbLogger

    cfg, state = session.cfg, RunState(out)
    if resuming:
        print(f"[psr_ray] resuming {out}: {state.finished_summary()}")
    elif state.exists:
        raise UserError(
            f"{out} already holds a run; continue it with `psr-ray run --resume {out}` or choose another run.output_dir"
        )
    session.check_writable()
    policy_version, policy_dir = FIRST_POLICY_VERSION, session.model_path
    for k in range(1, cfg.run.num_iterations + 1):
        train = state.stage(k, "train")
        if train is not None:
            policy_version, policy_dir = train["policy_version"], train["hf_dir"]
    if policy_version != FIRST_POLICY_VERSION:  # engines start on it: a damaged one must fail here, clearly
        from psr_ray.trainer.checkpoint import check_checkpoint

        check_checkpoint(Path(policy_dir).parent)
    all_problems = session.load_problems()  # before Ray: bad data fails fast
    counts = scaled_counts(out) if resuming else {}  # the pools a resumed run starts, checked as they will be
    session.start_ray(counts=counts)
    init, m0, heldout_pairs = init_for_run(session) if cfg.init.run_first else (None, None, [])
    if init is not None and policy_version == FIRST_POLICY_VERSION:
        policy_dir = init.hf_dir  # PSR starts from M1
    heldout = set(init.heldout_problem_ids) if init is not None else set()
    problems = [p for p in all_problems if p.problem_id not in heldout]  # judge pairs' problems: never searched
    if not problems:
        raise UserError(f"data.source {cfg.data.source!r} has no problems left after the init's held-out ones")
    logger = WandbLogger(
        mode=cfg.run.wandb_mode, project=cfg.run.wandb_project, name=cfg.run.name, config=cfg.to_dict(), dir=str(out)
    )
    # Engines start on the policy the run has reached, so a resumed run serves the right weights at once, as
    # many as `psr-ray scale` last asked for.
    rollout, judge = start_pools(session, policy_dir, policy_version, counts)
    psr = Driver(
        cfg=cfg,
        out=out,
        state=state,
        session=session,
        rollout=rollout,
        judge=judge,
        tokenizer=session.tokenizer,  # the configured model's (every policy shares it)
        problems=problems,
        policy_dir=policy_dir,
        policy_version=policy_version,
        logger=logger,
        init=init,
        m0=m0,
        heldout_pairs=heldout_pairs,
    )
    _check_engine_versions(psr)
    psr.elastic = start_elastic(session, out, psr.rollout, psr.judge)
    state.set_config(cfg.to_dict())  # the run has started (a resume may have changed RESUMABLE settings)
    return psr


def problems_for_iteration(cfg: PSRConfig, problems: list[Any], k: int) -> list[Any]:
    """Iteration k's prompts: the next `prompts_for_iteration` problems after earlier iterations' (wrapping)."""
    start = sum(cfg.prompts_for_iteration(i) for i in range(k - 1))
    count = cfg.prompts_for_iteration(k - 1)
    return [problems[(start + i) % len(problems)] for i in range(min(count, len(problems)))]


def _search_and_train(psr: Driver, k: int) -> None:
    """Search with M_k while the trainer consumes the pairs as they stream in, then train M_{k+1}."""
    from psr_ray import weight_sync
    from psr_ray.data.pairs_io import stream_pairs_dataset
    from psr_ray.init_data.labelled import dpo_rows
    from psr_ray.pipeline.search_stage import generate_pairs, raise_search_cause, stop_fit_on_failure
    from psr_ray.trainer.group import train_dpo
    from psr_ray.weight_sync.probe import make_probe

    if psr.state.done(k, "train"):
        return
    if psr.state.done(k, "search"):
        check_search_pairs(k, psr.state.stage(k, "search") or {}, policy_version=psr.policy_version)
    cfg, next_version = psr.cfg, psr.policy_version + 1
    problems = problems_for_iteration(cfg, psr.problems, k)
    # The trainer pushes M_{k+1} through it after training (weight_sync.push, on every rank); the engines serve
    # psr.policy_dir's weights: a failed sync restores them from there. The sync stage then checks the push.
    sender = weight_sync.sender_for(cfg, psr.engines, probe=make_probe(psr.tokenizer, psr.policy_dir),
                                    restore_dir=psr.policy_dir)  # fmt: skip
    start = time.perf_counter()
    stop_search, fitting = threading.Event(), threading.Event()
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="psr-search") as pool:
        search = None
        if not psr.state.done(k, "search"):
            search = pool.submit(
                generate_pairs,
                cfg,
                problems,
                iteration=k,
                policy_version=psr.policy_version,
                rollout=psr.rollout,
                judge=psr.judge,
                output_dir=str(psr.out),
                policy_dir=psr.policy_dir,  # what an engine restarted mid-search reloads
                stop=stop_search,
                on_turn=lambda: psr.elastic.tick(psr.policy_version, psr.policy_dir),
            )
            search.add_done_callback(functools.partial(stop_fit_on_failure, fitting=fitting))
        if cfg.weight_sync.colocate:  # one GPU for all: search first, then the engines sleep while training
            import ray

            if search is not None:
                search.result()
            ray.get([e.sleep.remote() for e in psr.engines])  # the push wakes them (WeightReceiver.begin_update)
        dataset = stream_pairs_dataset(str(psr.out), k)
        try:
            fitting.set()
            if search is not None and search.done():  # it failed before the fit began: nothing to interrupt
                search.result()
            result = train_dpo(
                cfg,
                policy_path=psr.policy_dir,
                reference_path=psr.policy_dir,  # the previous iteration's model, frozen
                dataset=dataset,
                output_dir=str(psr.out / "checkpoints" / f"iter_{k}"),
                policy_version=next_version,
                weight_sender=sender,
                heldout=dpo_rows(psr.heldout_pairs) or None,  # KL and reward margin of M_{k+1} vs M_k
            )
        except BaseException:  # a failed search interrupts the fit (stop_fit_on_failure): its error is the cause
            stop_search.set()  # a trainer error surfaces now, not after the whole search
            if search is not None:
                raise_search_cause(k, search, policy_version=psr.policy_version)
            raise
        finally:
            fitting.clear()
        if search is not None:
            summary = search.result()
            check_search_pairs(k, summary.to_dict(), policy_version=psr.policy_version)
            psr.state.record(k, "search", summary.to_dict() | psr.elastic.summary())
    search_summary = psr.state.stage(k, "search") or {}
    train_summary = {
        "policy_version": result.policy_version,
        "hf_dir": result.hf_dir,
        "checkpoint_dir": result.checkpoint_dir,
        "num_optimizer_steps": result.num_optimizer_steps,
        # Every committed pair once per epoch: equal to pairs_total x trainer.num_epochs.
        "num_pairs_trained": result.num_trained_rows,
        "num_pairs_committed": search_summary.get("pairs_total"),
        "heldout": result.heldout,
        "seconds": time.perf_counter() - start,
        "final": result.metrics[-1] if result.metrics else {},
        "weight_sync": result.weight_sync,  # the trainer's push into the engines (SyncReport.to_dict)
    }
    for step, metrics in enumerate(result.metrics):
        psr.logger.log({**metrics, "iteration": k, "train/step_in_iteration": step})
    if result.heldout:
        psr.logger.log({**result.heldout, "iteration": k})
    psr.logger.log(
        {f"search/{key}": value for key, value in search_summary.items() if isinstance(value, (int, float))}
        | {"iteration": k}
    )
    try:  # exactly once: a mismatch fails the run, its figures recorded, the trained model left on disk
        check_trained_pairs(k, trained=result.num_trained_rows, committed=search_summary.get("pairs_total", 0),
                            epochs=cfg.trainer.num_epochs, model_dir=result.hf_dir)  # fmt: skip
    except RuntimeError as err:
        psr.state.record_failure(k, "train", train_summary, error=str(err))
        raise
    psr.state.record(k, "train", train_summary)
    psr.policy_dir, psr.policy_version = result.hf_dir, result.policy_version


def _sync(psr: Driver, k: int) -> None:
    """The trainer pushed M_{k+1} at the end of training (its report is in the train stage): check it, reload
    any engine that does not serve it from the export (verified), record the figures (pipeline/sync_stage.py)."""
    from psr_ray.runtime import metrics

    if psr.state.done(k, "sync"):
        return
    summary = serve_policy(psr, pushed=(psr.state.stage(k, "train") or {}).get("weight_sync"))
    if summary["push_error"]:
        print(f"[psr_ray] iteration {k}: the trainer's weight push failed ({summary['push_error']}); "
              f"reloaded from the export instead")  # fmt: skip
    metrics.set_gauge("policy_version", psr.policy_version)
    psr.state.record(k, "sync", summary)
    psr.elastic.kill_retired()  # engines scaled away this iteration: the trainer's sender no longer holds them
    psr.logger.log({f"sync/{key}": v for key, v in summary.items() if isinstance(v, (int, float))} | {"iteration": k})


def serve_policy(psr: Driver, *, pushed: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every engine serving `psr.policy_version`, verified: an engine that does not (the trainer's `pushed`
    failed, Ray restarted it) is reloaded from `psr.policy_dir` with the probe checked (pipeline/sync_stage.py)."""
    from psr_ray.pipeline.sync_stage import sync_stage
    from psr_ray.weight_sync.probe import make_probe

    return sync_stage(psr.engines, pushed=pushed, policy_dir=psr.policy_dir, policy_version=psr.policy_version,
                      probe=make_probe(psr.tokenizer, psr.policy_dir), timeout_s=psr.cfg.weight_sync.timeout_s)  # fmt: skip


def _evaluate(psr: Driver, *, iteration: int) -> None:
    from psr_ray.evaluation.judging import iteration_pair_precision
    from psr_ray.evaluation.run_results import result_row
    from psr_ray.pipeline.eval_stage import iteration_scores
    from psr_ray.pipeline.init_stage import eft_mode

    done = psr.state.stage(iteration, "eval")
    if done is None:
        cfg = psr.cfg
        reloaded = serve_policy(psr)["reloaded_from_export"]  # an engine restarted since the sync is not scored
        if reloaded:
            print(f"[psr_ray] eval {iteration}: {reloaded} engine(s) no longer served policy {psr.policy_version}; "
                  "reloaded from its export, verified")  # fmt: skip
        # The judge the search uses: the likelihood ablation's own, else the pairwise judge the init trained.
        mode = cfg.judge.mode if cfg.judge.mode == JudgeMode.LIKELIHOOD else eft_mode(cfg)
        scores, from_cache = iteration_scores(psr, iteration, mode)
        judge = scores["judge"]
        precision = iteration_pair_precision(str(psr.out), iteration, psr.problems) if iteration else None
        done = {"rows": [result_row(psr.state, row, iteration, psr.policy_version) | {"eval_s": scores["eval_s"]}
                         for row in scores["benchmarks"]],
                "seconds": scores["eval_s"], "policy_version": psr.policy_version, "judge": judge,
                "pair_precision": precision, "judge_s": scores["judge_s"], "from_cache": from_cache}  # fmt: skip
        kill_windows.reached("eval")
        psr.state.record(iteration, "eval", done)
        for row in done["rows"]:
            psr.logger.log({f"eval/{row['benchmark']}/accuracy_boxed": row["accuracy_boxed"],
                            f"eval/{row['benchmark']}/accuracy": row["accuracy"], "iteration": iteration})  # fmt: skip
        if judge is not None:
            psr.logger.log({"eval/judge_accuracy": judge["accuracy"], "iteration": iteration})
        if precision is not None:
            psr.logger.log({"search/pair_precision": precision["precision"],
                            "search/random_pick_precision": precision["random_pick"], "iteration": iteration})  # fmt: skip
    psr.rows = [
        row
        for k in sorted(psr.state.data["iterations"], key=int)
        for row in (psr.state.stage(int(k), "eval") or {}).get("rows", [])
    ]
    _write_results(psr)


def _write_results(psr: Driver) -> None:
    from psr_ray.evaluation.run_results import write_results

    paths = write_results(psr.state, psr.out, judge_mode=str(psr.cfg.judge.mode), m0=psr.m0,
                          init_seconds=None if psr.init is None else psr.init.seconds)  # fmt: skip
    psr.logger.log_image("eval/accuracy", str(paths["plot"]))


def _stages(psr: Driver, iteration: int) -> dict[str, Any]:
    return psr.state.data["iterations"].get(str(iteration), {})


def _check_engine_versions(psr: Driver) -> list[int]:
    from psr_ray.weight_sync.base import engine_versions

    versions = engine_versions(psr.engines, names=psr.engine_names, timeout_s=psr.cfg.run.engine_call_timeout_s)
    if any(v != psr.policy_version for v in versions):
        raise RuntimeError(
            f"engines {psr.engine_names} serve policy versions {versions}, expected {psr.policy_version}"
        )
    return versions
