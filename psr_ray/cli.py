"""`psr-ray`: a thin command line over the library. No training logic lives here.

Every command takes `--config FILE` (repeatable, merged in order) and dotted `key=value` overrides, and
validates the result before Ray starts.
"""

from __future__ import annotations

import argparse
import json
import sys

from psr_ray import config as config_lib
from psr_ray.config import DEFAULT_CONFIG

EPILOG = """\
examples:
  psr-ray run                                     # the embedded default: SmolLM2-135M, GSM8K, local Ray on CPU
  psr-ray run --config jobs/configs/qwen2.5-math-7b.yaml run.ray_address=auto
  psr-ray run --resume runs/embedded              # continue a killed run from its last finished stage
  psr-ray validate --config my.yaml rollout.num_candidates=4
  psr-ray print-config --config jobs/configs/qwen2.5-math-7b.yaml
  psr-ray generate --num-problems 8               # one search pass: writes step pairs as Parquet
  psr-ray train --pairs runs/embedded/pairs/iter_0
  psr-ray eval --model embedded:smollm2-135m-instruct --benchmarks gsm8k --limit 50
  psr-ray init                                    # IFT/EFT data + SFT: M0 -> M1, judge accuracy before/after
  psr-ray submit --address http://127.0.0.1:8265 --config psr_ray/configs/embedded_cpu.yaml

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
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_config_args(p)
        if name in ("run", "generate", "train", "eval", "init"):
            p.add_argument("--verbose", action="store_true", help="print what Ray's workers log (vLLM engines, "
                           "trainer reports, Ray Data) here too; by default it stays in the log files named at start")
        return p

    command("validate", "Check a config (types, ranges, paths, GPUs) without starting anything; exit 1 on error.")
    command("print-config", "Print the fully resolved config as YAML.")
    p = command("run", "Run PSR iterations end to end: search -> judge -> step-DPO -> weight sync -> eval.")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last finished stage")
    p = command("generate", "One search pass with the current model: write step pairs (Parquet) and a summary.")
    p.add_argument("--num-problems", type=int, default=8, help="problems to search (default 8)")
    p.add_argument("--output", metavar="DIR", help="output folder (default: run.output_dir)")
    p = command("train", "Step-DPO on a Parquet folder of step pairs written by `generate` or `run`.")
    p.add_argument("--pairs", required=True, metavar="DIR", help="folder of step-pair Parquet files")
    p.add_argument("--output", metavar="DIR", help="checkpoint folder (default: run.output_dir/train)")
    p = command("eval", "Greedy evaluation on math benchmarks; prints accuracy, step statistics and throughput.")
    p.add_argument("--model", help="HF id, folder or embedded:smollm2-135m-instruct (default: model.path)")
    p.add_argument("--benchmarks", help="comma-separated: gsm8k, math500, math, gaokao2023en, minerva_math, svamp")
    p.add_argument("--limit", type=int, help="problems per benchmark (0 = all)")
    p = command("init", "Initialization: build IFT/EFT data and fine-tune M0 into M1 (SFT).")
    p.add_argument("--output", metavar="DIR", help="output folder (default: run.output_dir/init)")
    p = command("submit", "Submit `python -m psr_ray` (the run) to a Ray cluster as a job and stream its logs. "
                "The job validates cluster-side paths and GPUs on the cluster.")
    p.add_argument("--address", help="Ray dashboard address, e.g. http://127.0.0.1:8265 (default: $RAY_ADDRESS); "
                   "the auth token comes from $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token")
    p.add_argument("--no-wait", action="store_true", help="return after submitting")
    return parser


def load_config(args: argparse.Namespace, *, check_paths: bool = True) -> config_lib.PSRConfig:
    paths = args.config or [str(DEFAULT_CONFIG)]
    cfg = config_lib.load(paths, args.overrides)
    if args.command == "submit":  # paths and GPUs are the cluster's: the job validates them there
        return config_lib.validate(cfg, check_paths=False, gpu_available=True)
    return config_lib.validate(cfg, check_paths=check_paths)


def _print_yaml(cfg: config_lib.PSRConfig) -> None:
    from omegaconf import OmegaConf

    print(OmegaConf.to_yaml(OmegaConf.create(json.loads(json.dumps(cfg.to_dict())))), end="")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args)
    except ValueError as err:
        print(f"psr-ray {args.command}: {err}", file=sys.stderr)
        return 1
    if args.command == "validate":
        print(f"config OK ({', '.join(args.config or [str(DEFAULT_CONFIG)])})")
        return 0
    if args.command == "print-config":
        _print_yaml(cfg)
        return 0
    from psr_ray import commands, console  # the commands that start Ray and engines

    console.configure(verbose=getattr(args, "verbose", False))

    try:
        return getattr(commands, args.command.replace("-", "_"))(cfg, args)
    except ValueError as err:  # a user mistake found late (data, checkpoints, resume dirs): no traceback
        print(f"psr-ray {args.command}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
