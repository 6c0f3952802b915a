"""The `psr-ray` commands that start Ray, engines or trainers: each wires library functions together on one
`RunSession` (pipeline/session.py: the run folder's lock, problems, model, Ray, engine pools)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from psr_ray.config import DEFAULT_CONFIG, PSRConfig, UserError
from psr_ray.pipeline.preflight import validate


def run(cfg: PSRConfig, args: argparse.Namespace) -> int:
    from psr_ray.pipeline.loop import run as run_loop
    from psr_ray.pipeline.run_state import RunState

    resume_dir = args.resume
    if resume_dir is None and cfg.run.resume == "auto" and RunState(os.path.expanduser(cfg.run.output_dir)).exists:
        resume_dir = cfg.run.output_dir  # run.resume=auto: a resubmitted job continues its run
    run_loop(cfg, resume_dir=resume_dir)
    return 0


def generate(cfg: PSRConfig, args: argparse.Namespace) -> int:
    """One search pass with the configured model over `--num-problems` problems."""
    from psr_ray.data.pairs_io import MANIFEST, pairs_dir
    from psr_ray.pipeline.search_stage import generate_pairs
    from psr_ray.pipeline.session import RunSession

    if args.num_problems < 1:
        raise UserError(f"--num-problems must be >= 1, got {args.num_problems}")
    output_dir = args.output or cfg.run.output_dir
    if (pairs_dir(output_dir, 1) / MANIFEST).is_file() and not args.resume:
        raise UserError(f"{output_dir} already holds step pairs of an earlier pass ({pairs_dir(output_dir, 1)}); "
                        "pass another --output, or --resume to finish that pass")  # fmt: skip
    # The problems before the lock: a source with none fails without making the --output folder.
    problems = RunSession(cfg).load_problems(limit=args.num_problems)
    session = RunSession.locked(cfg, output_dir, command="generate")  # held until this process ends
    session.check_writable("--output")
    model_path = session.model_path
    session.start_ray(trainer=False)
    summary = generate_pairs(
        cfg,
        problems,
        iteration=1,
        policy_version=1,
        rollout=session.start_pool("rollout", model_path, policy_version=1),
        judge=session.start_pool("judge", model_path, policy_version=1),
        output_dir=output_dir,
    )
    for key, value in summary.to_dict().items():
        print(f"  {key:24s} {value:.3f}" if isinstance(value, float) else f"  {key:24s} {value}")
    session.release()
    return 0


def train(cfg: PSRConfig, args: argparse.Namespace) -> int:
    """Step-DPO of model.path (also the frozen reference) on a Parquet folder of pairs."""
    from psr_ray.pipeline.session import RunSession
    from psr_ray.trainer.group import read_pairs_dataset, train_dpo

    output_dir = args.output or f"{cfg.run.output_dir}/train"
    if Path(output_dir).is_dir() and any(Path(output_dir).iterdir()) and not args.resume:
        raise UserError(f"{output_dir} is not empty (an earlier `psr-ray train`?); pass another --output, "
                        "or --resume to continue from its checkpoint")  # fmt: skip
    session = RunSession.locked(cfg, output_dir, command="train")
    session.check_writable("--output")
    model_path = session.model_path
    dataset_dir = args.pairs
    if not Path(dataset_dir).is_dir():
        raise UserError(f"--pairs {dataset_dir}: no such folder")
    session.start_ray(engines=False)
    dataset = read_pairs_dataset(dataset_dir)
    result = train_dpo(
        cfg, policy_path=model_path, reference_path=model_path, dataset=dataset, output_dir=output_dir, policy_version=2
    )
    session.release()
    final = result.metrics[-1] if result.metrics else {}
    source = "the checkpoint already in --output (--resume)" if result.resumed else "this run"
    print(
        f"trained {result.num_optimizer_steps} optimizer steps on {result.num_trained_rows} pairs (all epochs; "
        f"{source}); HF export: {result.hf_dir}"
    )
    for key, value in final.items():
        print(f"  {key:24s} {value:.4f}")
    return 0


def eval(cfg: PSRConfig, args: argparse.Namespace) -> int:  # noqa: A001 - the command's name
    from psr_ray.evaluation.benchmarks import eval_command

    # `gsm8k, math500` as typed in a shell: names without their spaces.
    names = [name.strip() for name in (args.benchmarks or "").split(",") if name.strip()]
    benchmarks = names or list(cfg.eval.benchmarks)
    limit = cfg.eval.limit if args.limit is None else args.limit
    if limit < 0:
        raise UserError(f"--limit must be >= 0 (0 means all), got {limit}")
    cfg = validate(
        dataclasses.replace(
            cfg,
            model=dataclasses.replace(cfg.model, path=args.model or cfg.model.path),
            eval=dataclasses.replace(cfg.eval, benchmarks=tuple(benchmarks)),
        )
    )
    eval_command(cfg, cfg.model.path, benchmarks, limit, output_dir=f"{cfg.run.output_dir}/eval")
    return 0


def init(cfg: PSRConfig, args: argparse.Namespace) -> int:
    """IFT data and EFT pairs (M_ift's own candidates, labelled by the step oracle), SFT of model.path into M1,
    judge pair accuracy on held-out pairs and benchmark accuracy of M0 and M1."""
    from psr_ray.pipeline.init_stage import format_init, initialize
    from psr_ray.pipeline.session import RunSession

    result = initialize(RunSession(cfg), output_dir=args.output or f"{cfg.run.output_dir}/init")
    print(format_init(result))
    print(f"M1 (HF export): {result.hf_dir}")
    return 0


def submit(cfg: PSRConfig, args: argparse.Namespace) -> int:
    from psr_ray.pipeline import capacity
    from psr_ray.runtime.submit import submit as submit_job

    def check_cluster(address: str, nodes: list[dict[str, float]]) -> None:
        print(f"[psr_ray] the cluster at {address}: {capacity.describe(nodes)}")
        for warning in capacity.check_capacity(cfg, nodes, ask_autoscaler=False):
            print(f"[psr_ray] warning: {warning}", file=sys.stderr)

    return submit_job(args.address, args.config or [str(DEFAULT_CONFIG)], args.overrides, wait=not args.no_wait,
                      check_cluster=check_cluster)  # fmt: skip


def scale(args: argparse.Namespace) -> int:
    """Sets the engine counts of the run in `args.run_dir` (pipeline/elastic.py); its driver applies them."""
    from psr_ray.pipeline.elastic import request_scale

    targets = {role: n for role in ("rollout", "judge") if (n := getattr(args, role)) is not None}
    if not targets:
        raise UserError("give --rollout N and/or --judge M")
    now, warnings = request_scale(args.run_dir, targets, address=args.address)
    wanted = ", ".join(f"{role}={count}" for role, count in sorted(now.items()))
    print(f"[psr_ray] {args.run_dir}: engines asked for: {wanted} (applied at the search's next turn)")
    for warning in warnings:
        print(f"[psr_ray] warning: {warning}", file=sys.stderr)
    return 0
