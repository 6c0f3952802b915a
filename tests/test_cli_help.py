"""The CLI's help says what the commands really do (issue 22 §7: it named GSM8K, pairs/iter_0, 6 benchmarks)."""

from __future__ import annotations

from psr_ray.app.cli import EPILOG, build_parser
from psr_ray.config import DEFAULT_CONFIG, load
from psr_ray.data.problems import BENCHMARKS


def _help(command: str) -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices[command].format_help()


def test_run_help_names_the_presets_data_source():
    assert load([str(DEFAULT_CONFIG)], []).data.source.startswith("embedded:arith")
    assert "embedded:arith" in EPILOG
    assert "GSM8K" not in EPILOG


def test_train_example_names_a_pairs_folder_that_exists():
    assert "pairs/iter_1" in EPILOG and "pairs/iter_0" not in EPILOG  # iterations count from 1


def test_eval_help_lists_every_benchmark_name():
    text = " ".join(_help("eval").split())
    missing = [name for name in BENCHMARKS if name not in text]
    assert not missing, missing
