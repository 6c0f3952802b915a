"""IFT/EFT construction (exact segmentations of real GSM8K and MATH rows, balanced and correct EFT labels, a
held-out split by problem) and one end-to-end `initialize` on the tiny model: data, SFT, M0/M1 scores."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from psr_ray.data.problems import Problem
from psr_ray.init_data.build import (
    JUDGE_MODES,
    build_init_data,
    eft_rows,
    ift_rows,
    load_worked_problems,
    write_init_data,
)
from psr_ray.init_data.explain import changed_number, evaluate, explain
from psr_ray.init_data.segment import gsm8k_steps, math_steps, worked_solution
from psr_ray.prompts import Verdict, parse_verdict
from psr_ray.steps import extract_boxed, join_steps, split_steps

GSM8K_TRAIN = Path(__file__).resolve().parents[3] / "shared" / "data" / "gsm8k" / "train.jsonl"
needs_gsm8k = pytest.mark.skipif(not GSM8K_TRAIN.is_file(), reason=f"needs {GSM8K_TRAIN}")


class PlainTokenizer:
    """No chat template (prompts fall back to `User:`/`Assistant:`) and a visible EOS: enough for row text."""

    chat_template = None
    eos_token = "</s>"


def gsm8k_rows(limit: int) -> list[dict]:
    with GSM8K_TRAIN.open() as f:
        return [json.loads(next(f)) for _ in range(limit)]


@needs_gsm8k
def test_gsm8k_rows_segment_exactly():
    rows = gsm8k_rows(3)
    assert [gsm8k_steps(r["answer"]) for r in rows] == [
        ["Natalia sold 48/2 = 24 clips in May.", "Natalia sold 48+24 = 72 clips altogether in April and May.",
         "\\boxed{72}"],
        ["Weng earns 12/60 = $0.2 per minute.", "Working 50 minutes, she earned 0.2 x 50 = $10.", "\\boxed{10}"],
        ["In the beginning, Betty has only 100 / 2 = $50.", "Betty's grandparents gave her 15 * 2 = $30.",
         "This means, Betty needs 100 - 50 - 30 - 15 = $5 more.", "\\boxed{5}"],
    ]  # fmt: skip


@needs_gsm8k
def test_gsm8k_steps_keep_the_solution_text():
    for row in gsm8k_rows(50):
        question, steps, answer = worked_solution(row)
        body, final = row["answer"].split("####")
        original = re.sub(r"<<[^>]*>>", "", body)
        assert "".join("".join(steps[:-1]).split()) == "".join(original.split())
        assert steps[-1] == f"\\boxed{{{final.strip().replace(',', '')}}}" and answer == final.strip().replace(",", "")
        # The step format round-trips: what the engine writes is read back as the same steps.
        assert split_steps(join_steps(steps)) == steps
        assert question == row["question"].strip()


def test_math_solution_splits_into_sentences_outside_math():
    solution = (
        'For the piecewise function to be continuous, the cases must "meet" at $2$ and $-2$. For example, '
        "$ax+3$ and $x-5$ must be equal when $x=2$. This implies $a(2)+3=2-5$, which we solve to get "
        "$2a=-6 \\Rightarrow a=-3$. Similarly, $x-5$ and $2x-b$ must be equal when $x=-2$. Substituting, we get "
        "$-2-5=2(-2)-b$, which implies $b=3$.\n\nSo $a+b=-3+3=\\boxed{0}$."
    )  # the first row of MATH train
    assert math_steps(solution) == [
        'For the piecewise function to be continuous, the cases must "meet" at $2$ and $-2$.',
        "For example, $ax+3$ and $x-5$ must be equal when $x=2$.",
        "This implies $a(2)+3=2-5$, which we solve to get $2a=-6 \\Rightarrow a=-3$.",
        "Similarly, $x-5$ and $2x-b$ must be equal when $x=-2$.",
        "Substituting, we get $-2-5=2(-2)-b$, which implies $b=3$.",
        "So $a+b=-3+3=\\boxed{0}$.",
    ]
    # Periods inside math or braces never cut; text after the last boxed answer joins its step.
    assert math_steps("We get $x = 1. Y$ here. So \\boxed{\\text{A. B}}. Done. Yes.") == [
        "We get $x = 1. Y$ here.",
        "So \\boxed{\\text{A. B}}. Done. Yes.",
    ]
    assert math_steps("No boxed answer. Here.") is None
    assert worked_solution({"problem": "q", "solution": solution})[2] == "0"
    assert worked_solution({"problem": "q", "answer": "\\boxed{5}"}) is None  # a bare answer, no worked steps
    assert worked_solution({"problem": "q", "answer": "5"}) is None


def test_explanations_name_the_number_and_recompute():
    assert changed_number("so 6*2=12 pages", "so 6*2=9 pages") == ("12", "9", 7)
    assert evaluate("$12 x 5") == 60.0 and evaluate("48") is None and evaluate("2x") is None
    assert explain("q", "", "So he writes 6*2=12 pages", "So he writes 6*2=9 pages", good_letter="B") == (
        "The steps differ in one number: Step A has 9 where Step B has 12. "
        "Recomputing Step A: 6*2 = 12, not 9, so it is wrong. Step B is correct."
    )
    assert explain("q", "", "She sold 48+24 = 72 clips", "She sold 48+23 = 72 clips", good_letter="A") == (
        "The steps differ in one number: Step A has 24 where Step B has 23. "
        "Recomputing Step B: 48+23 = 71, not 72, so it is wrong. Step A is correct."
    )
    assert explain("She has 16 eggs.", "", "She has 16 eggs.", "She has 18 eggs.", good_letter="A").endswith(
        "The problem gives 16, so Step B's 18 is wrong. Step A is correct."
    )
    assert "The previous steps give 72" in explain(
        "q", "Step 1: 72 clips\n", "\\boxed{72}", "\\boxed{75}", good_letter="A"
    )


@needs_gsm8k
def test_eft_labels_are_balanced_and_point_at_the_uncorrupted_step():
    problems = []
    for i, row in enumerate(gsm8k_rows(30)):
        question, steps, _ = worked_solution(row)
        problems.append(Problem(f"p{i}", question, "x", steps=tuple(steps)))
    data = build_init_data(problems, num_ift=20, num_eft=20, test_fraction=0.2, seed=3)
    rows = eft_rows(PlainTokenizer(), data.eft_train)
    assert len(rows) == 20 * 2 * len(JUDGE_MODES)
    for mode in JUDGE_MODES:
        labels = [r["label"] for r in rows if r["mode"] == mode]
        assert labels.count("A") == labels.count("B") == 20
    pairs = {item.problem_id: item.pair for item in data.eft_train}
    for row in rows:
        pair = pairs[row["problem_id"]]
        good, bad = (row["step_a"], row["step_b"]) if row["label"] == "A" else (row["step_b"], row["step_a"])
        assert (good, bad) == (pair.good_step, pair.bad_step) and good != bad
        assert row["target_text"].endswith(f"{row['label']}]]</s>")
        if row["mode"] == "explain":
            assert row["prompt_text"].endswith("Explanation:")
            assert parse_verdict(row["target_text"]) == Verdict(row["label"])
            assert row["target_text"].endswith(f"\nVerdict: [[{row['label']}]]</s>")
        else:
            assert row["prompt_text"].endswith("Verdict: [[") and row["target_text"] == f"{row['label']}]]</s>"


@needs_gsm8k
def test_held_out_split_shares_no_problem_and_files_hold_the_rows(tmp_path):
    problems = load_worked_problems(str(GSM8K_TRAIN), seed=1)
    assert len(problems) == 7473 and problems[0].problem_id.startswith("gsm8k-train-")
    data = build_init_data(problems[:200], num_ift=50, num_eft=40, test_fraction=0.2)
    files = write_init_data(PlainTokenizer(), data, tmp_path)
    ids = {name: set(pq.read_table(path).column("problem_id").to_pylist()) for name, path in files.items()}
    train, test = ids["ift_train"] | ids["eft_train"], ids["ift_test"] | ids["eft_test"]
    assert not train & test
    assert (len(ids["ift_train"]), len(ids["eft_train"]), len(ids["ift_test"])) == (50, 40, 13)
    ift = pq.read_table(files["ift_train"]).to_pylist()
    assert ift == ift_rows(PlainTokenizer(), data.ift_train)
    # IFT target = the forced `Step 1:` prompt's continuation: the whole step-formatted solution and EOS.
    row = ift[0]
    assert row["prompt_text"].endswith("Assistant: Step 1:")
    assert "Step 1:" + row["target_text"] == row["solution"].rstrip("\n") + "</s>"
    assert extract_boxed(row["target_text"]) == row["answer"]
    with pytest.raises(ValueError, match="num_ift_examples"):
        build_init_data(problems[:20], num_ift=50, num_eft=5, test_fraction=0.2)


@pytest.mark.ray
@needs_gsm8k
def test_run_init_end_to_end_on_the_tiny_model(ray_cluster, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from psr_ray import config as C
    from psr_ray.init_data import initialize

    def kill_engines():
        for name in ray_cluster.util.list_named_actors():
            if name.startswith("psr-"):
                ray_cluster.kill(ray_cluster.get_actor(name))

    kill_engines()
    cfg = C.validate(C.load([], [
        f"model.path={tiny_model_dir}", "model.max_model_len=1024", f"data.source={GSM8K_TRAIN}",
        "judge.num_cpus_per_engine=0.5", "judge.max_explanation_tokens=8", "eval.max_tokens=16",
        "trainer.num_workers=2", "trainer.global_batch_size=2", "trainer.micro_batch_size=1",
        "trainer.max_seq_len=512", "trainer.sft_learning_rate=1e-3", "trainer.sft_num_epochs=1",
        "init.test_fraction=0.34", "run.wandb_mode=disabled",
    ]), gpu_available=False)  # fmt: skip
    try:
        result = initialize(cfg, output_dir=str(tmp_path / "init"), num_ift=4, num_eft=2)
    finally:
        kill_engines()
    for name in ("ift_train", "ift_test", "eft_train", "eft_test"):
        assert (tmp_path / "init" / f"{name}.parquet").is_file()
    assert (result.num_ift_train, result.num_eft_train, result.num_ift_test, result.num_sft_rows) == (4, 2, 3, 12)
    assert len(result.train_metrics) == 6  # 12 rows / global batch 2, one epoch
    assert [s.model for s in result.scores] == ["M0", "M1"]
    for scores in result.scores:
        assert {m: s["num_judgments"] for m, s in scores.judge.items()} == {"direct": 6, "explain": 6}
        assert scores.solving["n"] == 3
    assert "| M1 |" in result.table and (tmp_path / "init" / "results.md").read_text().startswith(result.table)
    model = AutoModelForCausalLM.from_pretrained(result.hf_dir)
    assert model.num_parameters() == AutoModelForCausalLM.from_pretrained(tiny_model_dir).num_parameters()
