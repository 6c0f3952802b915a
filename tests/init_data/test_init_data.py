"""IFT/EFT construction (exact segmentations of real GSM8K and MATH rows, EFT pairs from a model's own
candidates labelled by the oracle, balanced verdicts, a held-out split by problem) and one end-to-end
`initialize` on the tiny model: data, SFT, M0/M1 scores."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from psr_ray.config import JudgeMode
from psr_ray.core.prompts import Verdict, parse_verdict
from psr_ray.core.steps import extract_boxed, join_steps, split_steps, step_header
from psr_ray.data.problems import load_problems
from psr_ray.init_data.build import (
    eft_rows,
    ift_rows,
    load_worked_problems,
    loss_shares,
    pair_rows,
    read_pairs,
    split_problems,
    write_parquet,
)
from psr_ray.init_data.candidates import OraclePair, Sampling, best_and_worst, oracle_pairs
from psr_ray.init_data.labelled import LabelledPair
from psr_ray.init_data.segment import gsm8k_steps, math_steps, worked_solution
from psr_ray.testing.arith_engine import ArithEngine, off_by_one

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


def test_arith_rows_are_worked_solutions():
    problems = load_worked_problems("embedded:arith", seed=0)
    assert len(problems) == 4000 and problems[0].problem_id.startswith("arith-train-")
    reference = {p.problem_id: p for p in load_problems("embedded:arith", seed=None).problems}
    for p in problems[:50]:
        assert p.steps == reference[p.problem_id].steps and p.answer == reference[p.problem_id].answer


def test_best_and_worst_pick_a_right_and_a_wrong_distinct_step():
    import random

    rng = random.Random(0)
    assert best_and_worst(["a", "b", "c"], [True, True, True], rng) is None
    assert best_and_worst(["a", " ", "c"], [False, True, False], rng) is None  # the right one is empty
    assert best_and_worst(["a", "b", "a "], [True, False, False], rng) == ("a", "b")  # "a " is "a": never rejected
    picks = {best_and_worst(["r1", "r2", "w1", "w2"], [True, True, False, False], rng) for _ in range(50)}
    assert picks == {("r1", "w1"), ("r1", "w2"), ("r2", "w1"), ("r2", "w2")}


def _oracle_pair(i: int) -> OraclePair:
    pair = LabelledPair(f"q{i}", "Step 1: 2 x 3 = 6.\n", "6 + 4 = 10.", "6 + 4 = 11.")
    return OraclePair(f"p{i}", pair, 8, 3, "6 + 4 is not 11 but 10")


@pytest.mark.parametrize("mode", [JudgeMode.DIRECT, JudgeMode.EXPLAIN])
def test_eft_rows_are_balanced_and_point_at_the_right_step(mode):
    rows = eft_rows(PlainTokenizer(), [_oracle_pair(i) for i in range(5)], mode=mode)
    assert len(rows) == 10 and [r["label"] for r in rows].count("A") == 5
    for row in rows:
        good, bad = (row["step_a"], row["step_b"]) if row["label"] == "A" else (row["step_b"], row["step_a"])
        assert (good, bad) == ("6 + 4 = 10.", "6 + 4 = 11.")
        assert row["target_text"].endswith(f"{row['label']}]]</s>")
        other = "B" if row["label"] == "A" else "A"
        if mode is JudgeMode.EXPLAIN:
            assert row["prompt_text"].endswith("Explanation:")
            assert parse_verdict(row["target_text"]) == Verdict(row["label"])
            checks = {"A": "6 + 4 = 10, it writes 10" if row["label"] == "A" else "6 + 4 = 10, it writes 11"}
            checks["B"] = "6 + 4 = 10, it writes 11" if row["label"] == "A" else "6 + 4 = 10, it writes 10"
            assert row["target_text"] == (f" Step A: {checks['A']}. Step B: {checks['B']}. Step {other} is wrong: "
                                          f"6 + 4 is not 11 but 10. Step {row['label']} is correct.\n"
                                          f"Verdict: [[{row['label']}]]</s>")  # fmt: skip
        else:
            assert row["prompt_text"].endswith("Verdict: [[") and row["target_text"] == f"{row['label']}]]</s>"


def test_loss_shares_weigh_rows_alike_beside_the_token_shares():
    class CharTokenizer:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": list(range(len(text)))}

    parts = {"ift": [{"target_text": "x" * 74}] * 3, "eft": [{"target_text": "A]]"}]}
    shares = loss_shares(CharTokenizer(), parts)
    assert shares["ift"]["rows"] == 0.75 and shares["eft"]["rows"] == 0.25
    assert shares["eft"]["tokens"] == pytest.approx(3 / (3 * 74 + 3))
    assert loss_shares(CharTokenizer(), {"ift": parts["ift"], "eft": []})["eft"] == {"rows": 0.0, "tokens": 0.0}


def test_pair_files_round_trip(tmp_path):
    pairs = [_oracle_pair(i) for i in range(3)]
    assert read_pairs(write_parquet(pair_rows(pairs), tmp_path / "pairs.parquet")) == pairs


def test_held_out_split_shares_no_problem_and_ift_targets_are_the_solutions():
    problems = load_worked_problems("embedded:arith", seed=1)[:200]
    split = split_problems(problems, num_heldout=40, num_ift=50)
    ids = [{p.problem_id for p in part} for part in (split.heldout, split.ift, split.eft)]
    assert [len(x) for x in ids] == [40, 50, 110] and not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    row = ift_rows(PlainTokenizer(), split.ift)[0]
    assert row["prompt_text"].endswith("Assistant: " + step_header(1))
    assert step_header(1) + row["target_text"] == row["solution"].rstrip("\n") + "</s>"
    assert extract_boxed(row["target_text"]) == row["answer"]
    with pytest.raises(ValueError, match="num_ift_examples"):
        split_problems(problems[:20], num_heldout=10, num_ift=50)


def test_max_eft_keeps_the_first_eft_problems_and_the_rest_of_the_split():
    problems = load_worked_problems("embedded:arith", seed=1)[:200]
    full = split_problems(problems, num_heldout=40, num_ift=50)
    capped = split_problems(problems, num_heldout=40, num_ift=50, max_eft=7)
    assert (capped.heldout, capped.ift, capped.eft) == (full.heldout, full.ift, full.eft[:7])
    assert split_problems(problems, num_heldout=40, num_ift=50, max_eft=1000).eft == full.eft  # fewer there: all


# Settings added after caches were first built: a changed value keys another M1 (bf16 matmuls train another
# one), and at the default the key is the one computed before the setting existed, so those caches stay valid.
@pytest.mark.parametrize(("section", "name", "value"),
                         [("init", "max_eft_problems", "8"), ("trainer", "cpu_bf16_autocast", "true"),
                          ("trainer", "sft_micro_batch_size", "4"), ("trainer", "sft_zero_stage", "2")])  # fmt: skip
def test_an_added_setting_keys_the_init_cache_only_away_from_its_default(monkeypatch, section, name, value):
    from psr_ray import config as C
    from psr_ray.pipeline.init_cache import init_key

    default, changed = C.load([], []), C.load([], [f"{section}.{name}={value}"])
    assert init_key(default) != init_key(changed)
    plain = default.to_dict()
    del plain[section][name]
    before = init_key(default)
    monkeypatch.setattr(type(default), "to_dict", lambda self: plain)
    assert init_key(default) == before


def test_sft_checkpointing_is_memory_only_in_the_init_key():
    from psr_ray import config as C
    from psr_ray.pipeline.init_cache import init_key

    keys = {init_key(C.load([], overrides)) for overrides in ([], ["trainer.sft_gradient_checkpointing=false"],
                                                              ["trainer.sft_gradient_checkpointing=true"])}  # fmt: skip
    assert len(keys) == 1


def one_right_of_three(request, right: str) -> tuple[str, ...]:
    """The reference step's result off by one, a step with no equation, the reference step."""
    return (off_by_one(right), "We need to think.", right)


@pytest.mark.ray
def test_oracle_pairs_from_own_candidates(ray_cluster):
    import sys

    from psr_ray.core.steps import split_steps
    from psr_ray.oracle.exact import check_next_step

    problems = load_worked_problems("embedded:arith", seed=0)[:10]
    ray_cluster.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    actor = ray_cluster.remote(ArithEngine).options(num_cpus=0).remote(problems, candidates=one_right_of_three)
    sampling = Sampling(num_candidates=3, temperature=1.0, top_p=1.0, max_tokens=32, num_rollouts=2, seed=0)
    try:
        pairs, counts = oracle_pairs([actor], None, problems, num_pairs=6, sampling=sampling, chunk=4)
    finally:
        ray_cluster.kill(actor)
    assert counts == {"sites": 8, "candidates": 24, "right": 8, "mixed_sites": 8}  # two chunks of 4 for 6 pairs
    assert len(pairs) == 6
    by_id = {p.problem_id: p for p in problems}
    for item in pairs:
        problem, pair = by_id[item.problem_id], item.pair
        previous = split_steps(pair.prefix) if pair.prefix else []
        assert check_next_step(problem, previous, pair.good_step) and not check_next_step(
            problem, previous, pair.bad_step
        )
        assert item.why_bad in ("it computes nothing: it has no equation",) or " is not " in item.why_bad


def right_reworded_too(request, right: str) -> tuple[str, ...]:
    """`one_right_of_three`'s and the reference step reworded (`Then ...`, right too): a model's own right step."""
    return (*one_right_of_three(request, right), "Then " + right[0].lower() + right[1:])


@pytest.mark.ray
def test_oracle_pairs_on_the_models_own_prefixes(ray_cluster):
    import sys

    from psr_ray.oracle.exact import check_next_step

    problems = load_worked_problems("embedded:arith", seed=0)[:4]
    ray_cluster.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    actor = ray_cluster.remote(ArithEngine).options(num_cpus=0).remote(problems, candidates=right_reworded_too)
    sampling = Sampling(num_candidates=4, temperature=1.0, top_p=1.0, max_tokens=32, num_rollouts=2, seed=0)
    try:
        pairs, counts = oracle_pairs([actor], None, problems, num_pairs=100, sampling=sampling, own_prefixes=True)
    finally:
        ray_cluster.kill(actor)
    # One reference site per problem, and a walk over every step of each solution (all its steps are right).
    walked = sum(len(p.steps) for p in problems)
    assert counts == {"sites": 4 + walked, "candidates": 4 * (4 + walked), "right": 2 * (4 + walked),
                      "mixed_sites": 4 + walked, "own_sites": walked, "own_mixed_sites": walked}  # fmt: skip
    assert len(pairs) == 4 + walked
    by_id = {p.problem_id: p for p in problems}
    own = [item for item in pairs if "Then " in item.pair.prefix]
    assert own  # prefixes written by the model itself, as the search sees them, not only reference ones
    for item in pairs:
        previous = split_steps(item.pair.prefix) if item.pair.prefix else []
        assert check_next_step(by_id[item.problem_id], previous, item.pair.good_step)
        assert not check_next_step(by_id[item.problem_id], previous, item.pair.bad_step)


@pytest.mark.ray
def test_run_init_end_to_end_on_the_tiny_model(ray_cluster, tiny_model_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from psr_ray import config as C
    from psr_ray.pipeline import preflight
    from psr_ray.pipeline.init_stage import initialize, read_result
    from psr_ray.pipeline.session import RunSession

    def kill_engines():
        for name in ray_cluster.util.list_named_actors():
            if name.startswith("psr-"):
                ray_cluster.kill(ray_cluster.get_actor(name))

    kill_engines()
    cfg = preflight.validate(C.load([], [
        f"model.path={tiny_model_dir}", "model.max_model_len=1024", "data.source=embedded:arith",
        "judge.num_cpus_per_engine=0.5", "judge.max_explanation_tokens=8", "eval.max_tokens=16",
        "eval.benchmarks=[arith]", "eval.limit=3", "rollout.max_step_tokens=8",
        "trainer.num_workers=2", "trainer.global_batch_size=2", "trainer.micro_batch_size=1",
        "trainer.max_seq_len=512", "trainer.sft_learning_rate=1e-3", "trainer.sft_num_epochs=1",
        "init.num_ift_examples=4", "init.num_candidates=2", "init.num_heldout_problems=3", "init.num_heldout_pairs=2",
        "init.num_eft_pairs=3", "init.max_eft_problems=8", "run.wandb_mode=disabled",
    ]), gpu_available=False)  # fmt: skip  # 8 EFT problems: the tiny model gives no pair, the scan would walk all
    try:
        result = initialize(RunSession(cfg), output_dir=str(tmp_path / "init"))
    finally:
        kill_engines()
    for name in ("ift_train", "eft_train", "heldout_pairs"):
        assert (tmp_path / "init" / f"{name}.parquet").is_file()
    # The random tiny model never writes a right step: no EFT pair, no held-out pair; IFT alone is trained.
    assert (result.num_ift_rows, result.num_eft_pairs, result.num_heldout_pairs) == (4, 0, 0)
    assert result.eft_counts["sites"] > 0 and result.eft_counts["right"] == 0
    assert len(result.train_metrics) == 2  # 4 rows / global batch 2, one epoch
    # EFT candidates come from M_ift (M0 after the IFT-only SFT, phase A0), also at its own prefixes (its walks
    # end at once here: no right step); M1 is trained from M0, not from M_ift.
    assert len(result.ift_train_metrics) == 2 and "/init/ift_sft/" in result.ift_hf_dir
    assert result.eft_counts["own_sites"] > 0 and result.eft_counts["own_mixed_sites"] == 0
    assert result.eft_counts["sites"] == 2 * 8  # init.max_eft_problems bounds the scan: a site and a walk each
    assert list(result.seconds)[:3] == ["ift_sft", "eft_candidates", "sft"]
    assert (result.configured_eft_pairs, result.eft_ift_ratio) == (3, 0.0)
    assert result.paper_eft_ift_ratio == pytest.approx(4200 / 28900)
    assert result.loss_shares["ift"]["rows"] == 1.0 and result.loss_shares["eft"] == {"rows": 0.0, "tokens": 0.0}
    assert list(result.scores) == ["M0", "M1"]
    for scores in result.scores.values():
        assert scores["judge"] is None and [r["n"] for r in scores["benchmarks"]] == [3]
    assert result.heldout_problem_ids == [p.problem_id for p in load_worked_problems("embedded:arith")[:3]]
    text = (tmp_path / "init" / "results.md").read_text()
    assert "| M1 | init SFT (IFT + EFT) | arith | 3 |" in text and "EFT:IFT = 0:4 rows = 0.000 (the paper's" in text
    assert read_result(tmp_path / "init") == result
    model = AutoModelForCausalLM.from_pretrained(result.hf_dir)
    assert model.num_parameters() == AutoModelForCausalLM.from_pretrained(tiny_model_dir).num_parameters()

    # Every phase (M_ift's SFT included) left its result: an init killed before init.json resumes and redoes
    # none of them (no engine, no trainer group starts).
    import ray.train.torch

    def started(*args, **kwargs):
        raise AssertionError("a finished init phase ran again")

    (tmp_path / "init" / "init.json").unlink()
    monkeypatch.setattr(RunSession, "temporary_engines", started)
    monkeypatch.setattr(ray.train.torch, "TorchTrainer", started)
    again = initialize(RunSession(cfg), output_dir=str(tmp_path / "init"))
    assert again == dataclasses.replace(result, seconds=again.seconds)
