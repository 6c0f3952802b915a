"""The run's measurements and results table: pair precision of stored pairs by the oracle, models built from
`state.json`, McNemar against the named baseline, the Markdown table and the PNG."""

from __future__ import annotations

import json

import pytest

from psr_ray.core.steps import join_steps
from psr_ray.data.problems import load_problems
from psr_ray.evaluation.judging import pairs_precision
from psr_ray.evaluation.run_results import models_from_state
from psr_ray.evaluation.tables import compare, format_run_table, write_run_report
from psr_ray.pipeline.run_state import RunState


def test_pair_precision_of_stored_pairs_by_the_oracle():
    problem = load_problems("embedded:arith", split="train", seed=None, limit=1).problems[0]
    right = problem.steps[1]
    result = right.split(" = ")[1].split()[0]
    wrong = right.replace(f"= {result}", f"= {int(result) + 1}", 1)
    base = {"problem_id": problem.problem_id, "prefix": join_steps(problem.steps[:1])}
    rows = [
        base | {"chosen": right, "rejected": wrong, "candidates": [right, wrong, wrong, "x"]},
        base | {"chosen": wrong, "rejected": right, "candidates": [wrong, right]},
        {"problem_id": "gsm8k-test-0", "prefix": "", "chosen": "a", "rejected": "b", "candidates": ["a", "b"]},
    ]
    summary = pairs_precision(rows, {problem.problem_id: problem})
    assert (summary.num_pairs, summary.num_precise, summary.num_reversed) == (2, 1, 1)  # the gsm8k pair is skipped
    # Random pick: [right, wrong, wrong, x]: right chosen 1/4 of the time, then a wrong one always -> 1/4;
    # [wrong, right]: right chosen 1/2 -> 1/2. Mean 3/8.
    assert summary.random_pick == pytest.approx(3 / 8)
    assert pairs_precision(rows[2:], {}) is None


def _row(bits: str, iteration: int) -> dict:
    n, k = len(bits), bits.count("1")
    return {"iteration": iteration, "benchmark": "arith", "n": n, "accuracy_boxed": k / n, "accuracy": k / n,
            "accuracy_boxed_ci95": [0.0, 1.0], "accuracy_ci95": [0.0, 1.0], "boxed_bits": bits,
            "lenient_bits": bits, "problems_digest": "d"}  # fmt: skip


def test_models_from_state_and_the_table(tmp_path):
    state = RunState(tmp_path)
    judge = {"accuracy": 0.5, "accuracy_ci95": [0.4, 0.6], "num_judgments": 300, "num_pairs": 150,
             "pair_accuracy": 0.72, "pair_accuracy_ci95": [0.64, 0.78], "share_a": 0.9}  # fmt: skip
    state.record(0, "eval", {"rows": [_row("0011000000", 0)], "judge": judge, "pair_precision": None, "seconds": 5.0})
    state.record(1, "search", {"pairs_total": 40, "seconds": 30.0})
    state.record(1, "train", {"seconds": 60.0})
    precision = {"precision": 0.75, "precision_ci95": [0.6, 0.86], "random_pick": 0.3, "num_pairs": 40}
    state.record(1, "eval", {"rows": [_row("1111111000", 1)], "judge": judge, "pair_precision": precision,
                             "seconds": 6.0})  # fmt: skip
    m0 = {"benchmarks": [_row("0000000000", 0)], "judge": judge, "eval_s": 4.0}
    models = models_from_state(state, judge_mode="oracle", m0=m0, init_seconds={"sft": 100.0})
    assert [m["model"] for m in models] == ["M0", "M1", "M2"]
    assert models[2]["trained_on"] == "M1's ORACLE-judged (ablation) pairs" and models[2]["pairs"] == 40
    tests = compare(models)
    # M0 -> M1: 2 improved, none lost: p = 2 * (1/2)^2 = 0.5; M1 -> M2: 5 improved, 0 lost: p = 2/32.
    assert tests[("M1", "arith")]["p_value"] == 0.5
    assert (tests[("M2", "arith")]["only_model"], tests[("M2", "arith")]["p_value"]) == (5, 0.0625)
    # A named baseline instead of the previous entry; rows on other problems are not compared.
    other = dict(models[2], model="M2 random", baseline="M1", rows=[dict(_row("1111111000", 1), problems_digest="e")])
    assert ("M2 random", "arith") not in compare(models + [other])
    table = format_run_table(models)
    assert (
        "| M2 | M1's ORACLE-judged (ablation) pairs | arith | 10 | 70.0 [0.0, 100.0] | 70.0 [0.0, 100.0] | "
        "0.062 (vs M1: 5+/0-) | 72.0 [64.0, 78.0] (n=150) | 50.0 | 90.0 | 40 | 75.0 [60.0, 86.0] (n=40) | 30.0 |"
        in table
    )
    # The judge column is pair accuracy (both orders) with its CI; per-judgment accuracy and share "A" beside it.
    assert "| judge pair acc % [95% CI] | judgment acc % | share A % | pairs |" in table.splitlines()[0]
    paths = write_run_report(models, str(tmp_path / "report"), title="t")
    assert json.loads(paths["json"].read_text())[0]["model"] == "M0"
    assert paths["plot"].read_bytes().startswith(b"\x89PNG")


def test_plot_accepts_intervals_that_miss_their_point_by_a_rounding_error(tmp_path):
    # Wilson's lower end of 0/n can come out a hair above 0; errorbar refuses negative error lengths.
    row = dict(_row("000", 0), accuracy_boxed_ci95=[5.5e-17, 0.56])
    judge = {"accuracy": 0.5, "accuracy_ci95": [0.4, 0.6], "num_judgments": 4, "num_pairs": 2,
             "pair_accuracy": 0.5, "pair_accuracy_ci95": [0.5 + 1e-16, 0.6], "share_a": 0.5}  # fmt: skip
    paths = write_run_report([{"model": "M1", "rows": [row], "judge": judge}], str(tmp_path))
    assert paths["plot"].is_file()


def test_peak_memory_is_sampled_per_stage_and_reported():
    import time

    from psr_ray.evaluation.run_results import memory_line
    from psr_ray.runtime.memory import PeakMemory, machine_gib

    with PeakMemory(interval_s=0.05) as memory:
        block = bytearray(256 * 2**20)  # zero-filled: its pages are resident
        time.sleep(0.2)
        first = memory.take()
        del block
        time.sleep(0.3)
        middle = memory.take()  # a sample taken before the `del` may land just after the first take()
        time.sleep(0.3)
        second = memory.take()
    assert first >= 0.25 and second < first - 0.2  # a take() reports the peak since the previous one only
    last = memory.take()  # stopped: no sampler thread races this one
    assert memory.peak_gib == max(first, middle, second, last)  # the overall is the largest stage peak
    line = memory_line({"start": 1.0, "iter 1/2 search+train": 3.0})
    total = machine_gib()
    assert line.startswith(
        f"Peak memory (PSS of this node's run processes, GiB): 3.0 in `iter 1/2 search+train`, "
        f"{100 * 3.0 / total:.0f}% of this machine's {total:.1f} GiB ({3.0 / (total / 2):.2f} x half of it)."
    )
    assert line.endswith("Per stage: start 1.0, iter 1/2 search+train 3.0.") and memory_line({}) == ""
    roles = {"iter 1/2 search+train": {"trainer worker 1": 2.0, "driver": 1.0}, "start": {"driver": 1.0}}
    assert memory_line({"start": 1.0, "iter 1/2 search+train": 3.0}, roles).endswith(
        "Per stage: start 1.0, iter 1/2 search+train 3.0. At that peak: trainer worker 1 2.00, driver 1.00."
    )


def test_results_carry_the_memory_split_by_role_and_the_trainer_budget(tmp_path):
    from psr_ray.evaluation.run_results import trainer_memory_lines
    from psr_ray.pipeline.run_state import RunState

    state = RunState(tmp_path)
    state.record_peak("iter 1/1 search+train", 3.0, {"trainer worker 1": 2.0, "driver": 1.0})
    state.record(1, "train", {"final": {"train/loss": 0.6, "memory/runtime_gib": 0.5, "memory/params_gib": 0.25,
                                        "memory/accounted_gib": 0.75, "memory/worker0_peak_rss_gib": 1.0,
                                        "memory/worker0_pss_gib": 0.9}})  # fmt: skip
    stored = RunState(tmp_path).data
    assert stored["peak_memory_roles_gib"] == {"iter 1/1 search+train": {"trainer worker 1": 2.0, "driver": 1.0}}
    assert trainer_memory_lines(RunState(tmp_path)) == (
        "Trainer memory, iteration 1 (GiB): worker0 peak RSS 1.00 (PSS 0.90 at the end); accounted per worker 0.75 "
        "= runtime 0.50 + params 0.25."
    )


def test_iteration_table_shows_the_fit_and_the_sync_of_each_iteration(tmp_path):
    from psr_ray.evaluation.run_results import ITERATION_HEADER, iteration_table
    from psr_ray.pipeline.run_state import RunState

    state = RunState(tmp_path)
    assert iteration_table(state) == ""
    state.record(1, "search", {"pairs_total": 7, "margin_min": 1.0, "margin_q1": 1.0, "margin_median": 2.0,
                               "margin_q3": 3.0, "margin_max": 4.0})  # fmt: skip
    state.record(1, "train", {"num_optimizer_steps": 2, "num_pairs_trained": 7,
                              "heldout": {"heldout/kl_per_token": 0.0157, "heldout/reward_accuracy": 0.875}})  # fmt: skip
    state.record(1, "sync", {"transport": "object_store", "num_engines": 2, "num_bytes": 538_000_000, "seconds": 1.83,
                             "gbytes_per_s": 0.294})  # fmt: skip
    assert iteration_table(state).splitlines() == [
        ITERATION_HEADER,
        "|" + "---|" * 12,
        "| 1 | 7 | 1.00/1.00/2.00/3.00/4.00 | 2 | 7 | 1.57e-02 | 87.5 | object_store | 2 | 538 | 1.83 | 0.29 |",
    ]
