"""Evaluation: exact scoring and step statistics, batching, the report files, and `psr-ray eval` on real
tiny vLLM engines."""

from __future__ import annotations

import dataclasses
import json
import types

import pytest

from psr_ray.data.problems import Problem
from psr_ray.engines.api import split_batches
from psr_ray.evaluation.benchmarks import problems_digest, score_solution, summarize
from psr_ray.evaluation.tables import format_table, write_report, write_solutions

JANET = Problem("gsm8k-test-0", "Janet's ducks ...", "18", "gsm8k")


def _scores():
    # What a model writes after the prompt's `Step 1:` starts with the space of its first word.
    return [
        # two steps, boxed and right
        score_solution(JANET, " 16 - 3 - 4 = 9 eggs.\nStep 2: 9 * 2 = 18 dollars, \\boxed{18}.", 20),
        # one step, no box, wrong
        score_solution(JANET, " She makes 20 dollars.\nThe answer is 20", 10),
        # two steps, right by the last number only
        score_solution(JANET, " 9 * 2 = 18 dollars.\nStep 2: so she makes 18.", 12),
        # nothing written
        score_solution(JANET, "", 0),
    ]


def test_score_solution():
    boxed, prose, unboxed, empty = _scores()
    assert boxed.text == "Step 1: 16 - 3 - 4 = 9 eggs.\nStep 2: 9 * 2 = 18 dollars, \\boxed{18}."
    assert (boxed.predicted, boxed.correct, boxed.correct_boxed, boxed.num_steps, boxed.formatted) == (
        "18",
        True,
        True,
        2,
        True,
    )
    assert (prose.predicted, prose.correct, prose.correct_boxed, prose.num_steps, prose.formatted) == (
        "20",
        False,
        False,
        1,
        False,
    )
    assert (unboxed.predicted, unboxed.correct, unboxed.correct_boxed, unboxed.num_steps, unboxed.formatted) == (
        "18",
        True,
        False,
        2,
        False,
    )
    assert (empty.predicted, empty.correct, empty.num_steps, empty.formatted) == (None, False, 0, False)


def test_solutions_file_holds_the_question_and_gold_answer(tmp_path):
    """solutions.jsonl is read on its own: each line says what was asked and what was right."""
    result = types.SimpleNamespace(benchmarks=[summarize("gsm8k", _scores()[:1])])
    line = json.loads(write_solutions(result, str(tmp_path)).read_text())
    assert {key: line[key] for key in ("benchmark", "problem_id", "question", "answer", "predicted", "correct")} == {
        "benchmark": "gsm8k", "problem_id": "gsm8k-test-0", "question": "Janet's ducks ...", "answer": "18",
        "predicted": "18", "correct": True}  # fmt: skip


def test_summarize():
    result = summarize("gsm8k", _scores(), num_skipped=1)
    assert result.row(2) == {
        "iteration": 2,
        "benchmark": "gsm8k",
        "n": 4,
        "accuracy": 0.5,
        "accuracy_boxed": 0.25,
        "steps_per_solution": 1.25,  # (2 + 1 + 2 + 0) / 4
        "tokens_per_step": 8.4,  # 42 tokens / 5 steps
        "format_compliance": 0.25,
        "num_tokens": 42,
        "num_skipped": 1,
        # Wilson 95% intervals of 1/4 and 2/4; per-problem bits in order, for McNemar.
        "accuracy_boxed_ci95": [pytest.approx(0.045586, abs=1e-5), pytest.approx(0.699358, abs=1e-5)],
        "accuracy_ci95": [pytest.approx(0.150039, abs=1e-5), pytest.approx(0.849961, abs=1e-5)],
        "boxed_bits": "1000",
        "lenient_bits": "1010",
        "problems_digest": problems_digest(["gsm8k-test-0"] * 4),
    }
    assert result.num_skipped == 1
    empty = summarize("svamp", [])
    assert (empty.n, empty.accuracy, empty.tokens_per_step) == (0, 0.0, 0.0)


def test_split_batches():
    assert split_batches(5, num_engines=2, batch_size=256) == [(0, 3), (3, 5)]
    assert split_batches(600, num_engines=1, batch_size=256) == [(0, 200), (200, 400), (400, 600)]
    assert split_batches(1, num_engines=3, batch_size=256) == [(0, 1)]
    assert split_batches(0, num_engines=2, batch_size=256) == []


ROWS = [
    {"iteration": 0, "benchmark": "gsm8k", "n": 50, "accuracy": 0.1, "accuracy_boxed": 0.02,
     "steps_per_solution": 3.5, "tokens_per_step": 41.25, "format_compliance": 0.04, "num_tokens": 7000},
    {"iteration": 0, "benchmark": "math500", "n": 50, "accuracy": 0.04, "accuracy_boxed": 0.0,
     "steps_per_solution": 2.0, "tokens_per_step": 60.0, "format_compliance": 0.0, "num_tokens": 6000},
    {"iteration": 1, "benchmark": "gsm8k", "n": 50, "accuracy": 0.16, "accuracy_boxed": 0.12,
     "steps_per_solution": 4.0, "tokens_per_step": 30.0, "format_compliance": 0.5, "num_tokens": 6000},
    {"iteration": 1, "benchmark": "math500", "n": 50, "accuracy": 0.06, "accuracy_boxed": 0.06,
     "steps_per_solution": 3.0, "tokens_per_step": 50.0, "format_compliance": 0.3, "num_tokens": 7500},
]  # fmt: skip


def test_format_table():
    assert format_table(ROWS[:2]) == (
        "| iteration | benchmark | n | accuracy % (boxed) | lenient accuracy % | format % | steps/solution | tokens/step |\n"
        "|---|---|---|---|---|---|---|---|\n"
        "| 0 | gsm8k | 50 | 2.0 | 10.0 | 4.0 | 3.50 | 41.2 |\n"
        "| 0 | math500 | 50 | 0.0 | 4.0 | 0.0 | 2.00 | 60.0 |"
    )
    with_ci = dict(ROWS[0], accuracy_boxed_ci95=[0.0035, 0.1050])
    assert "| 2.0 [0.4, 10.5] | 10.0 |" in format_table([with_ci])


def test_write_report(tmp_path):
    paths = write_report(ROWS, str(tmp_path / "report"))
    assert json.loads(paths["json"].read_text()) == ROWS
    assert paths["markdown"].read_text() == "# Evaluation (greedy)\n\n" + format_table(ROWS) + "\n"
    png = paths["plot"].read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


@pytest.mark.ray
def test_eval_on_tiny_engines(ray_cluster, tiny_model_dir, tmp_path, capsys):
    from transformers import AutoTokenizer

    from psr_ray import config
    from psr_ray.engines.pool import start_engine_pool
    from psr_ray.evaluation.benchmarks import eval_command, evaluate

    cfg = config.PSRConfig()
    cfg = dataclasses.replace(
        cfg,
        rollout=dataclasses.replace(cfg.rollout, num_engines=1),
        eval=dataclasses.replace(cfg.eval, max_tokens=16),
    )
    running = set(ray_cluster.util.list_named_actors())
    (engine,) = start_engine_pool(cfg, "rollout", tiny_model_dir).actors
    try:
        tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
        alone = evaluate([engine], tokenizer, ["gsm8k"], limit=5, max_tokens=8)
        # The same actor twice with batches of 2: three calls over two handles must come back in order.
        split = evaluate([engine, engine], tokenizer, ["gsm8k"], limit=5, max_tokens=8, batch_size=2)
        assert [s.text for s in split.benchmarks[0].scores] == [s.text for s in alone.benchmarks[0].scores]
        assert [s.problem_id for s in alone.benchmarks[0].scores] == [f"gsm8k-test-{i}" for i in range(5)]

        # `psr-ray eval`: finds the running engine by name, reuses it and leaves it running.
        out = tmp_path / "eval"
        result = eval_command(cfg, tiny_model_dir, ["gsm8k", "svamp"], 3, output_dir=str(out))
        assert ray_cluster.get(engine.policy_version.remote()) == 0
    finally:
        if "psr-rollout-0" not in running:
            ray_cluster.kill(engine)

    assert [(b.benchmark, b.n) for b in result.benchmarks] == [("gsm8k", 3), ("svamp", 3)]
    scores = [s for b in result.benchmarks for s in b.scores]
    assert [s.problem_id for s in scores] == [f"{name}-test-{i}" for name in ("gsm8k", "svamp") for i in range(3)]
    # Greedy generations of at most max_tokens, each written after the forced first header.
    assert all(s.text.startswith("Step 1:") and 1 <= s.num_tokens <= 16 for s in scores)
    assert result.num_tokens == sum(s.num_tokens for s in scores) and result.elapsed_s > 0
    printed = capsys.readouterr().out
    assert "| 0 | gsm8k | 3 |" in printed and "tokens/s" in printed
    assert [row["benchmark"] for row in json.loads((out / "results.json").read_text())] == ["gsm8k", "svamp"]
    solutions = [json.loads(line) for line in (out / "solutions.jsonl").read_text().splitlines()]
    assert [s["text"] for s in solutions] == [s.text for s in scores]
