"""The `psr-ray` commands that start Ray, engines or trainers. Each wires library functions together."""

from __future__ import annotations

import argparse

from psr_ray.config import PSRConfig


def _not_yet(what: str, issue: int) -> int:
    print(f"psr-ray: {what} is not available in this version yet (tracked as issue {issue}).")
    return 2


def run(cfg: PSRConfig, args: argparse.Namespace) -> int:
    return _not_yet("`run` (the M1 -> Mk driver loop)", 6)


def generate(cfg: PSRConfig, args: argparse.Namespace) -> int:
    return _not_yet("`generate` (the step-wise self-judged search)", 3)


def train(cfg: PSRConfig, args: argparse.Namespace) -> int:
    return _not_yet("`train` (the ZeRO-3 step-DPO trainer group)", 4)


def eval(cfg: PSRConfig, args: argparse.Namespace) -> int:  # noqa: A001 - the command's name
    return _not_yet("`eval` (benchmark evaluation)", 5)


def init(cfg: PSRConfig, args: argparse.Namespace) -> int:
    return _not_yet("`init` (IFT/EFT data and SFT into M1)", 7)


def submit(cfg: PSRConfig, args: argparse.Namespace) -> int:
    return _not_yet("`submit` (ray job submission)", 8)
