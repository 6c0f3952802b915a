"""`psr-ray`: a thin command line over the library. No training logic lives here.

Every command takes `--config FILE` (repeatable, merged in order; a bare `x.yaml` argument counts as one) and
dotted `key=value` overrides, and validates the result before Ray starts. A user mistake (a `UserError`,
raised by the validation and input layers, or an OS error here on the driver: a bad config, file, folder or
address) ends in one line on stderr naming it and exit status 1, never a traceback; any other failure, a
`ValueError` raised inside an engine or worker included, prints one line and saves its traceback to a file
it names.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import traceback

from psr_ray import config as config_lib
from psr_ray.config import DEFAULT_CONFIG
from psr_ray.data.problems import BENCHMARKS
from psr_ray.pipeline import preflight

EPILOG = """\
examples:
  psr-ray run                                     # the embedded default: SmolLM2-135M, embedded:arith, local Ray on CPU
  psr-ray run --config jobs/configs/qwen2.5-math-7b.yaml run.ray_address=auto
  psr-ray run --resume runs/embedded              # continue a killed run from its last finished stage
  psr-ray validate --config my.yaml rollout.num_candidates=4
  psr-ray print-config --config jobs/configs/qwen2.5-math-7b.yaml
  psr-ray generate --num-problems 8               # one search pass: writes step pairs as Parquet
  psr-ray train --pairs runs/embedded/pairs/iter_1
  psr-ray eval --model embedded:smollm2-135m-instruct --benchmarks gsm8k --limit 50
  psr-ray init                                    # IFT/EFT data + SFT: M0 -> M1, judge accuracy before/after
  psr-ray submit --address http://127.0.0.1:8265 --config psr_ray/configs/embedded_cpu.yaml
  psr-ray scale runs/embedded --rollout 2         # resize a running run's engine pools (applied mid-search)

Without --config, commands use psr_ray/configs/embedded_cpu.yaml (the embedded CPU preset).
Overrides are dotted keys: section.field=value, sections: model data rollout judge search trainer
weight_sync eval init run. Lists use brackets: run.prompts_per_iteration=[400,800,1200].
"""


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        action="append",
        default=None,
        metavar="FILE",
        help="YAML config; repeat to merge several (later wins). Default: psr_ray/configs/embedded_cpu.yaml",
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. trainer.beta=0.4")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="psr-ray",
        description="Process-based Self-Rewarding (arXiv 2503.03746) on Ray: the policy proposes candidate "
        "reasoning steps, judges them pairwise itself, and trains on the step preferences with DeepSpeed "
        "ZeRO-3 step-DPO; new weights go back into the running vLLM engines after every iteration.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _add_config_args(p)
        if name in ("run", "generate", "train", "eval", "init"):
            p.add_argument(
                "--verbose",
                action="store_true",
                help="print what Ray's workers log (vLLM engines, "
                "trainer reports, Ray Data) here too; by default it stays in the log files named at start",
            )
        return p

    command("validate", "Check a config (types, ranges, paths, GPUs) without starting anything; exit 1 on error.")
    command("print-config", "Print the fully resolved config as YAML.")
    p = command("run", "Run PSR iterations end to end: search -> judge -> step-DPO -> weight sync -> eval.")
    p.add_argument(
        "--resume",
        metavar="DIR",
        help="continue the run in DIR from its last finished stage, with "
        "its stored config (overrides of run.num_iterations, run.ray_address, timeouts, resources only)",
    )
    p = command("generate", "One search pass with the current model: write step pairs (Parquet) and a summary.")
    p.add_argument("--num-problems", type=int, default=8, help="problems to search (default 8)")
    p.add_argument("--output", metavar="DIR", help="output folder (default: run.output_dir)")
    p.add_argument("--resume", action="store_true", help="finish an earlier pass in --output instead of refusing")
    p = command("train", "Step-DPO on a Parquet folder of step pairs written by `generate` or `run`.")
    p.add_argument("--pairs", required=True, metavar="DIR", help="folder of step-pair Parquet files")
    p.add_argument("--output", metavar="DIR", help="checkpoint folder (default: run.output_dir/train)")
    p.add_argument("--resume", action="store_true", help="continue from (or return) a checkpoint in --output")
    p = command("eval", "Greedy evaluation on math benchmarks; prints accuracy, step statistics and throughput.")
    p.add_argument("--model", help="HF id, folder or embedded:smollm2-135m-instruct (default: model.path)")
    p.add_argument(
        "--benchmarks",
        help=f"comma-separated names ({', '.join(BENCHMARKS)}) or .jsonl paths (default: eval.benchmarks)",
    )
    p.add_argument("--limit", type=int, help="problems per benchmark (0 = all)")
    p = command("init", "Initialization: build IFT/EFT data and fine-tune M0 into M1 (SFT).")
    p.add_argument("--output", metavar="DIR", help="output folder (default: run.output_dir/init)")
    p = command(
        "submit",
        "Submit `python -m psr_ray` (the run) to a Ray cluster as a job and stream its logs. "
        "The job validates cluster-side paths and GPUs on the cluster.",
    )
    p.add_argument(
        "--address",
        help="Ray dashboard address, e.g. http://127.0.0.1:8265 (default: $RAY_ADDRESS); "
        "the auth token comes from $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token",
    )
    p.add_argument("--no-wait", action="store_true", help="return after submitting")
    help_text = ("Resize the engine pools of a running `psr-ray run`: new engines load the policy being searched "
                 "before they take requests; removed ones finish their calls first. Applied between search turns.")  # fmt: skip
    p = sub.add_parser("scale", help=help_text, description=help_text, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("run_dir", metavar="RUN_DIR", help="the running run's output folder (run.output_dir)")
    p.add_argument("--rollout", type=int, help="rollout engines wanted")
    p.add_argument("--judge", type=int, help="judge engines wanted (a run with judge.num_engines > 0)")
    p.add_argument("--address", help="the Ray cluster's GCS host:port (default: the one in RUN_DIR/ray.json)")
    return parser


def load_config(args: argparse.Namespace, *, check_paths: bool = True) -> config_lib.PSRConfig:
    if getattr(args, "resume", None) and args.command == "run":
        from psr_ray.pipeline.run_dir import resume_config

        return resume_config(args.resume, args.overrides, args.config)
    paths = args.config or [str(DEFAULT_CONFIG)]
    cfg = config_lib.load(paths, args.overrides)
    if args.command == "submit":  # paths and GPUs are the cluster's: the job validates them there
        return preflight.validate(cfg, check_paths=False, gpu_available=True)
    return preflight.validate(cfg, check_paths=check_paths)


def _yaml_arguments_as_configs(args: argparse.Namespace) -> None:
    """`psr-ray validate x.yaml` means `--config x.yaml`: a bare argument naming a YAML file is a config."""
    configs = [a for a in getattr(args, "overrides", []) if "=" not in a and a.endswith((".yaml", ".yml"))]
    if configs:
        args.overrides = [a for a in args.overrides if a not in configs]
        args.config = (args.config or []) + configs


def _print_yaml(cfg: config_lib.PSRConfig) -> None:
    from omegaconf import OmegaConf

    print(OmegaConf.to_yaml(OmegaConf.create(json.loads(json.dumps(cfg.to_dict())))), end="")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _yaml_arguments_as_configs(args)
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        print(f"psr-ray {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        return report_error(args.command, err)


def report_error(command: str, err: Exception) -> int:
    """Prints what went wrong on stderr and returns the exit status (1). A user mistake (`is_user_error`) is
    one line naming it; anything else is an internal error: one line, its traceback saved to a file it names.
    Call it inside the `except` block that caught `err` (the traceback file is the one being handled)."""
    if is_user_error(err):
        print(f"psr-ray {command}: {_one_line(err)}", file=sys.stderr)
        return 1
    path = _save_traceback(command)
    shown = _remote_cause(err) or err  # a worker's error: its own message, not Ray's whole remote traceback
    print(f"psr-ray {command} failed: {type(err).__name__}: {_one_line(shown)} (traceback: {path})", file=sys.stderr)
    return 1


def is_user_error(err: BaseException) -> bool:
    """A `UserError` (the validation and input layers raise it) or an OS error raised here on the driver (a
    user's file or folder). An error that comes back from a Ray task or actor is internal whatever its type:
    `ray.get` re-raises a worker's `ValueError` as a `RayTaskError` that is also a `ValueError`."""
    if _remote_cause(err) is not None:
        return False
    return isinstance(err, (config_lib.UserError, OSError))


def _remote_cause(err: BaseException) -> BaseException | None:
    """The exception a Ray worker raised, when `err` is the `RayTaskError` that `ray.get` raised for it."""
    exceptions = sys.modules.get("ray.exceptions")  # Ray is loaded wherever a RayTaskError can exist
    if exceptions is None or not isinstance(err, exceptions.RayTaskError):
        return None
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, BaseException) else err


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "scale":  # the run's stored config applies, not a new one
        from psr_ray.app import commands

        return commands.scale(args)
    cfg = load_config(args)
    if args.command in ("validate", "run") and not getattr(args, "resume", None):
        # A --config file replaces the preset: say where each section came from.
        paths = args.config or [str(DEFAULT_CONFIG)]
        print(config_lib.section_sources(paths, args.overrides, preset=str(DEFAULT_CONFIG)))
    if args.command == "validate":
        print(f"config OK ({', '.join(args.config or [str(DEFAULT_CONFIG)])})")
        return 0
    if args.command == "print-config":
        _print_yaml(cfg)
        return 0
    from psr_ray.app import commands
    from psr_ray.runtime import console  # the commands that start Ray and engines

    console.configure(verbose=getattr(args, "verbose", False))

    return getattr(commands, args.command.replace("-", "_"))(cfg, args)


def _one_line(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror and err.filename:
        return f"cannot use {err.filename}: {err.strerror}"
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return " ".join(lines) if lines else type(err).__name__


def _save_traceback(command: str) -> str:
    fd, path = tempfile.mkstemp(prefix=f"psr-ray-{command}-", suffix=".traceback")
    with os.fdopen(fd, "w") as f:
        traceback.print_exc(file=f)
    return path


if __name__ == "__main__":
    sys.exit(main())
