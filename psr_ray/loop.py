"""The PSR driver loop, top to bottom.

The configured model is M1 (policy version 1). Iteration k = 1..K:

  1. search   M_k proposes candidate steps and judges them pairwise; pairs stream to Parquet
  2. train    step-DPO of M_{k+1} against the frozen reference M_k, consuming that stream as it grows
  3. sync     the trainer's rank 0 pushes M_{k+1} into every rollout and judge engine in place
  4. eval     greedy accuracy of M_{k+1} on the benchmarks (M1 is evaluated first, as iteration 0)

Every finished stage is recorded in `<output_dir>/state.json` (psr_ray.run_state), so `psr-ray run --resume`
continues a killed run from its last finished stage. Results go to `<output_dir>/results.{json,md}`,
`accuracy.png` and wandb.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import time
from pathlib import Path
from typing import Any

from psr_ray.config import PSRConfig, from_dict
from psr_ray.engines.pool import EnginePool
from psr_ray.run_state import RunState

FIRST_POLICY_VERSION = 1


@dataclasses.dataclass
class Driver:
    """What the driver holds across stages: the engine pools, the problems, the served policy, the results."""

    cfg: PSRConfig
    out: Path
    state: RunState
    rollout: EnginePool
    judge: EnginePool
    tokenizer: Any
    problems: list[Any]
    policy_dir: str
    policy_version: int
    logger: Any
    rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def engines(self) -> list[Any]:
        """Every engine actor handle, rollout first."""
        return self.rollout.actors + self.judge.actors


def run(cfg: PSRConfig, *, resume_dir: str | None = None) -> Driver:
    """Runs (or resumes) all iterations. The returned `Driver` holds the results rows and the engine handles:
    the engines live as long as it does (they are the driver's actors, not detached)."""
    from tqdm import tqdm

    psr = _start(cfg, resume_dir)
    cfg = psr.cfg
    stages = tqdm(total=1 + 4 * cfg.run.num_iterations, desc="PSR", unit="stage", dynamic_ncols=True)
    try:
        _evaluate(psr, iteration=0)
        stages.update(1)
        for k in range(1, cfg.run.num_iterations + 1):
            stages.set_description(f"PSR iteration {k}/{cfg.run.num_iterations}")
            _search_and_train(psr, k)
            stages.update(2)
            _sync(psr, k)
            stages.update(1)
            _evaluate(psr, iteration=k)
            stages.update(1)
    finally:
        stages.close()
        psr.logger.finish()
    print(f"\nResults ({psr.out / 'results.md'}):\n")
    print((psr.out / "results.md").read_text())
    return psr


def _start(cfg: PSRConfig, resume_dir: str | None) -> Driver:
    from transformers import AutoTokenizer

    from psr_ray.cluster import init_ray
    from psr_ray.data.problems import load_problems
    from psr_ray.engines.pool import start_engine_pool
    from psr_ray.metrics import WandbLogger
    from psr_ray.models import resolve_model_path

    out = Path(resume_dir or cfg.run.output_dir).expanduser()
    state = RunState(out)
    if resume_dir is not None:
        if not state.exists:
            raise ValueError(f"--resume {resume_dir}: no state.json there; start a new run with `psr-ray run`")
        cfg = from_dict(state.data["config"])  # the run continues with the config it started with
        print(f"[psr_ray] resuming {out}: {_finished_summary(state)}")
    elif state.exists:
        raise ValueError(f"{out} already holds a run; continue it with `psr-ray run --resume {out}` "
                         "or choose another run.output_dir")
    else:
        state.set_config(cfg.to_dict())

    base_model = resolve_model_path(cfg.model.path, cfg.run.cache_dir)
    policy_version, policy_dir = FIRST_POLICY_VERSION, base_model
    for k in range(1, cfg.run.num_iterations + 1):
        train = state.stage(k, "train")
        if train is not None:
            policy_version, policy_dir = train["policy_version"], train["hf_dir"]
    if policy_version != FIRST_POLICY_VERSION:  # engines start on it: a damaged one must fail here, clearly
        from psr_ray.trainer.checkpoint import check_checkpoint

        check_checkpoint(Path(policy_dir).parent)

    init_ray(cfg)
    loaded = load_problems(cfg.data.source, split=cfg.data.split, seed=cfg.data.shuffle_seed,
                           max_chars=cfg.data.max_problem_chars)
    if loaded.skipped:
        print(f"[psr_ray] {cfg.data.source}: {loaded.summary()}")
        for line, reason in loaded.skipped[:10]:
            print(f"[psr_ray]   skipped line {line}: {reason}")
    if not loaded.problems:
        raise ValueError(f"data.source {cfg.data.source!r} yielded no usable problems")
    logger = WandbLogger(mode=cfg.run.wandb_mode, project=cfg.run.wandb_project, name=cfg.run.name,
                         config=cfg.to_dict(), dir=str(out))
    # Engines start on the policy the run has reached, so a resumed run serves the right weights at once.
    psr = Driver(
        cfg=cfg,
        out=out,
        state=state,
        rollout=start_engine_pool(cfg, "rollout", policy_dir, policy_version=policy_version),
        judge=start_engine_pool(cfg, "judge", policy_dir, policy_version=policy_version),
        tokenizer=AutoTokenizer.from_pretrained(base_model, trust_remote_code=cfg.model.trust_remote_code),
        problems=loaded.problems,
        policy_dir=policy_dir,
        policy_version=policy_version,
        logger=logger,
    )
    _check_engine_versions(psr)
    return psr


def problems_for_iteration(cfg: PSRConfig, problems: list[Any], k: int) -> list[Any]:
    """Iteration k's prompts: the next `prompts_for_iteration` problems after earlier iterations' (wrapping)."""
    start = sum(cfg.prompts_for_iteration(i) for i in range(k - 1))
    count = cfg.prompts_for_iteration(k - 1)
    return [problems[(start + i) % len(problems)] for i in range(min(count, len(problems)))]


def _search_and_train(psr: Driver, k: int) -> None:
    """Search with M_k while the trainer consumes the pairs as they stream in, then train M_{k+1}."""
    from psr_ray.data.pairs_io import stream_pairs_dataset
    from psr_ray.search.generate import generate_pairs
    from psr_ray.trainer.group import train_dpo
    from psr_ray.weight_sync import backend_for, make_sender
    from psr_ray.weight_sync.probe import make_probe

    if psr.state.done(k, "train"):
        return
    cfg, next_version = psr.cfg, psr.policy_version + 1
    problems = problems_for_iteration(cfg, psr.problems, k)
    # The engines serve psr.policy_dir's weights: a failed sync restores them from there.
    sender = make_sender(backend_for(cfg), psr.engines, probe=make_probe(psr.tokenizer, psr.policy_dir),
                         restore_dir=psr.policy_dir, bucket_mb=cfg.weight_sync.bucket_mb,
                         timeout_s=cfg.weight_sync.timeout_s)  # fmt: skip
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="psr-search") as pool:
        search = None
        if not psr.state.done(k, "search"):
            search = pool.submit(
                generate_pairs, cfg, problems, iteration=k, policy_version=psr.policy_version,
                rollout=psr.rollout, judge=psr.judge, output_dir=str(psr.out),
                policy_dir=psr.policy_dir,  # what an engine restarted mid-search reloads
            )
        if cfg.weight_sync.colocate:  # one GPU for all: search first, then the engines sleep while training
            import ray

            if search is not None:
                search.result()
            ray.get([e.sleep.remote() for e in psr.engines])  # the push wakes them (receivers.begin_update)
        dataset = stream_pairs_dataset(str(psr.out), k)
        result = train_dpo(
            cfg,
            policy_path=psr.policy_dir,
            reference_path=psr.policy_dir,  # the previous iteration's model, frozen
            dataset=dataset,
            output_dir=str(psr.out / "checkpoints" / f"iter_{k}"),
            policy_version=next_version,
            num_pairs=_expected_pairs(cfg, len(problems)),
            on_weights=lambda state_dict: sender.send(state_dict, policy_version=next_version),
        )
        if search is not None:
            summary = search.result()
            psr.state.record(k, "search", summary.to_dict())
    search_summary = psr.state.stage(k, "search") or {}
    train_summary = {
        "policy_version": result.policy_version,
        "hf_dir": result.hf_dir,
        "checkpoint_dir": result.checkpoint_dir,
        "num_optimizer_steps": result.num_optimizer_steps,
        "seconds": time.perf_counter() - start,
        "final": result.metrics[-1] if result.metrics else {},
        "weight_sync": result.weight_sync,  # the trainer's push into the engines (SyncReport.to_dict)
    }
    psr.state.record(k, "train", train_summary)
    for step, metrics in enumerate(result.metrics):
        psr.logger.log({**metrics, "iteration": k, "train/step_in_iteration": step})
    psr.logger.log({f"search/{key}": value for key, value in search_summary.items() if isinstance(value, (int, float))}
                   | {"iteration": k})
    psr.policy_dir, psr.policy_version = result.hf_dir, result.policy_version


def _sync(psr: Driver, k: int) -> None:
    """The trainer pushed M_{k+1} at the end of training (its report is in the train stage): check it, reload
    any engine that does not serve it from the export (verified), record the figures (weight_sync/stage.py)."""
    from psr_ray import metrics
    from psr_ray.weight_sync.probe import make_probe
    from psr_ray.weight_sync.stage import sync_stage

    if psr.state.done(k, "sync"):
        return
    summary = sync_stage(psr.engines, pushed=(psr.state.stage(k, "train") or {}).get("weight_sync"),
                         policy_dir=psr.policy_dir, policy_version=psr.policy_version,
                         probe=make_probe(psr.tokenizer, psr.policy_dir), timeout_s=psr.cfg.weight_sync.timeout_s)  # fmt: skip
    if summary["push_error"]:
        print(f"[psr_ray] iteration {k}: the trainer's weight push failed ({summary['push_error']}); "
              f"reloaded from the export instead")  # fmt: skip
    metrics.set_gauge("policy_version", psr.policy_version)
    metrics.set_gauge("weight_sync_seconds", summary["seconds"])
    psr.state.record(k, "sync", summary)
    psr.logger.log({f"sync/{key}": v for key, v in summary.items() if isinstance(v, (int, float))} | {"iteration": k})


def _evaluate(psr: Driver, *, iteration: int) -> None:
    from psr_ray.eval import evaluate
    from psr_ray.report import write_report

    done = psr.state.stage(iteration, "eval")
    if done is None:
        cfg = psr.cfg
        result = evaluate(psr.engines, psr.tokenizer, list(cfg.eval.benchmarks), limit=cfg.eval.limit or None,
                          max_tokens=cfg.eval.max_tokens)
        done = {"rows": [_result_row(psr, row, iteration) | {"eval_s": result.elapsed_s} for row in result.rows(iteration)],
                "seconds": result.elapsed_s}
        psr.state.record(iteration, "eval", done)
        for row in done["rows"]:
            psr.logger.log({f"eval/{row['benchmark']}/accuracy": row["accuracy"], "iteration": iteration})
    psr.rows = [row for k in sorted(psr.state.data["iterations"], key=int)
                for row in (psr.state.stage(int(k), "eval") or {}).get("rows", [])]
    paths = write_report(psr.rows, str(psr.out))
    psr.logger.log_image("eval/accuracy", str(paths["plot"]))


def _result_row(psr: Driver, row: dict[str, Any], iteration: int) -> dict[str, Any]:
    """An eval row with the iteration's search and training figures beside it (the results table)."""
    search = psr.state.stage(iteration, "search") or {}
    train = psr.state.stage(iteration, "train") or {}
    return {
        **row,
        "policy_version": psr.policy_version,
        "pairs": search.get("pairs_total"),
        "rollbacks": search.get("rollbacks"),
        "unparseable_rate": search.get("unparseable_rate"),
        "search_train_s": train.get("seconds"),
        **_sync_figures(psr.state.stage(iteration, "sync")),
    }


def _sync_figures(sync: dict[str, Any] | None) -> dict[str, Any]:
    """The results table's weight-sync columns for an iteration's sync stage."""
    if not sync:
        return {}
    return {"sync_transport": sync.get("transport"), "sync_engines": sync.get("num_engines"),
            "sync_mb": sync.get("num_bytes", 0) / 1e6, "sync_s": sync.get("seconds"),
            "sync_gbps": sync.get("gbytes_per_s")}  # fmt: skip


def _check_engine_versions(psr: Driver) -> None:
    from psr_ray.weight_sync import engine_versions

    versions = engine_versions(psr.engines)
    if any(v != psr.policy_version for v in versions):
        raise RuntimeError(f"engines serve policy versions {versions}, expected {psr.policy_version}")


def _expected_pairs(cfg: PSRConfig, num_problems: int) -> int:
    # The cosine schedule needs a length before the stream ends: about half the step cap per problem.
    return max(1, num_problems * max(1, cfg.search.max_steps // 2))


def _finished_summary(state: RunState) -> str:
    done = [f"{k}:{'+'.join(s for s in ('search', 'train', 'sync', 'eval') if state.done(int(k), s))}"
            for k in sorted(state.data["iterations"], key=int)]
    return "finished " + (", ".join(done) if done else "nothing yet")
