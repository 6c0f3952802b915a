"""The exact step check of the built-in task and the oracle's verdicts and pair precision, on hand cases."""

from __future__ import annotations

import pytest

from psr_ray.core.steps import join_steps
from psr_ray.data.arith import split_rows
from psr_ray.data.problems import Problem, load_benchmark, load_problems
from psr_ray.engines.api import JudgeRequest
from psr_ray.oracle.exact import check_next_step, check_steps, has_exact_check, recompute, reference_values, why_wrong
from psr_ray.oracle.judge import label_steps, oracle_judgments
from psr_ray.oracle.precision import pair_precision, random_pick_precision

# Level 3: 4 x 6 = 24 marbles; + 5 = 29; 29 x 3 = 87 dollars.
PROBLEM = Problem(
    "arith-test-0",
    "Tom buys 4 bags of marbles. Each bag has 6 marbles. Later he buys 5 more marbles. "
    "He sells each of the marbles for 3 dollars. How many dollars does he get?",
    "87",
    "arith-3",
    ("Tom buys 4 x 6 = 24 marbles.", "After getting 5 more, Tom has 24 + 5 = 29 marbles.",
     "Selling them gives 29 x 3 = 87 dollars. The answer is \\boxed{87}."),
)  # fmt: skip


def test_reference_steps_of_every_generated_problem_pass():
    assert reference_values(PROBLEM) == [24.0, 29.0, 87.0]
    for split in ("train", "test"):
        for problem in load_problems("embedded:arith", split=split, seed=None).problems[:300]:
            assert has_exact_check(problem) and all(check_steps(problem, problem.steps)), problem


@pytest.mark.parametrize(
    ("previous", "step", "right"),
    [
        ([], "Tom buys 4 x 6 = 24 marbles.", True),
        ([], "He has 6 * 4 = 24 marbles in all.", True),  # other words, operand order, `*`
        ([], "Tom buys 4 x 6 = 25 marbles.", False),  # wrong arithmetic
        ([], "Tom buys 4 + 6 = 10 marbles.", False),  # right arithmetic, wrong operation
        ([], "Tom buys 4 x 7 = 28 marbles.", False),  # an invented number
        ([], "First we find how many marbles Tom buys.", False),  # no equation
        ([], "4 x 6 = 24 and 24 + 5 = 29.", False),  # two operations in one step: skips ahead
        ([], "Tom buys 4 x 6 = 24 marbles. The answer is \\boxed{24}.", False),  # boxed too early
        (["Tom buys 4 x 6 = 24 marbles."], "Tom has 24 + 5 = 29 marbles.", True),
        (["Tom buys 4 x 6 = 24 marbles."], "Tom buys 4 x 6 = 24 marbles.", False),  # a repeated step
        (["Tom buys 4 x 6 = 24 marbles."], "Tom has 29 x 3 = 87 dollars.", False),  # 29 is not known yet
        (["Tom buys 4 x 6 = 25 marbles."], "Tom has 24 + 5 = 29 marbles.", False),  # the prefix is off the path
        (list(PROBLEM.steps[:2]), "Selling them gives 29 x 3 = 87 dollars. The answer is \\boxed{87}.", True),
        (list(PROBLEM.steps[:2]), "He gets $29 x 3 = $87. The answer is \\boxed{87}.", True),
        (list(PROBLEM.steps[:2]), "Selling them gives 29 x 3 = 87 dollars.", False),  # the last step must box it
        (list(PROBLEM.steps[:2]), "Selling them gives 29 x 3 = 87 dollars. The answer is \\boxed{88}.", False),
        (list(PROBLEM.steps), "The answer is \\boxed{87}.", False),  # a step past the last one
    ],
)
def test_exact_check_hand_cases(previous, step, right):
    assert check_next_step(PROBLEM, previous, step) is right


def test_oracle_verdicts_and_labels():
    right, wrong = PROBLEM.steps[0], "Tom buys 4 x 6 = 26 marbles."
    requests = [
        JudgeRequest(PROBLEM.question, "", right, wrong),
        JudgeRequest(PROBLEM.question, "", wrong, right),
        JudgeRequest(PROBLEM.question, "", right, right),
        JudgeRequest(PROBLEM.question, "", wrong, wrong),
    ]
    verdicts = [(j.verdict, j.prob_a, j.policy_version) for j in oracle_judgments(PROBLEM, requests, policy_version=3)]
    assert verdicts == [("A", 1.0, 3), ("B", 0.0, 3), ("draw", 0.5, 3), ("draw", 0.5, 3)]
    prefix = join_steps(PROBLEM.steps[:1])
    assert label_steps(PROBLEM, prefix, ["Tom has 24 + 5 = 29 marbles.", "Tom has 24 + 5 = 30 marbles."]) == [
        True,
        False,
    ]
    gsm = load_benchmark("gsm8k", limit=1).problems[0]
    with pytest.raises(ValueError, match="no exact step check"):
        label_steps(gsm, "", ["x"])


def test_random_pick_precision_hand_values():
    # 1 right of 3 distinct: chosen right w.p. 1/3, then rejected wrong surely -> 1/3.
    assert random_pick_precision(["r", "w1", "w2"], [True, False, False]) == pytest.approx(1 / 3)
    # 2 right, 2 wrong: each right chosen (1/2) picks a wrong one w.p. 2/3 -> 1/3.
    assert random_pick_precision(["r1", "r2", "w1", "w2"], [True, True, False, False]) == pytest.approx(1 / 3)
    # Identical texts are never the rejected step of each other; an empty candidate is never picked.
    assert random_pick_precision(["r", "r", "w", ""], [True, True, False, False]) == pytest.approx(2 / 3)
    assert random_pick_precision(["same", "same"], [True, True]) == 0.0
    summary = pair_precision([(True, False, 0.25), (True, True, 0.5), (False, True, 0.0), (True, False, 0.25)])
    assert (summary.num_pairs, summary.num_precise, summary.num_reversed) == (4, 2, 1)
    assert summary.precision == 0.5 and summary.random_pick == 0.25
    assert summary.above_random is False  # 2 of 4: the interval is wide


def test_splits_are_disjoint_and_levels_take_turns():
    train, test = split_rows("embedded:arith", "train"), split_rows("embedded:arith", "test")
    assert not {r["question"] for r in train} & {r["question"] for r in test}
    assert [r["level"] for r in test[:6]] == [2, 3, 4, 2, 3, 4]
    assert all(len(r["steps"]) == r["level"] for r in test)
    assert load_benchmark("arith-3", limit=5).problems[0].problem_id == "arith-3-test-0"
    with pytest.raises(ValueError, match="levels L in 2-6"):
        load_problems("embedded:arith-9")


def test_why_wrong_and_recompute_say_what_a_judge_can_check():
    assert why_wrong(PROBLEM, 0, "Tom buys 4 x 6 = 25 marbles.") == "4 x 6 is not 25 but 24"
    assert (
        why_wrong(PROBLEM, 0, "Tom buys 4 x 7 = 28.")
        == "7 is neither a number of the problem nor a result of the previous steps"
    )
    assert why_wrong(PROBLEM, 0, "Tom buys 4 + 6 = 10.") == "4 + 6 is not the operation the problem asks for next"
    assert (
        why_wrong(PROBLEM, 1, "Tom buys 4 x 6 = 24.")
        == "it repeats a result of the previous steps instead of taking the next one"
    )
    assert why_wrong(PROBLEM, 0, "We think.") == "it computes nothing: it has no equation"
    assert why_wrong(PROBLEM, 0, PROBLEM.steps[0]) is None
    assert recompute("So 4 x 11 = 54 pages.") == "4 x 11 = 44, it writes 54"
    assert recompute("24 / 0 = 3") == "24 / 0 = undefined, it writes 3"
    assert recompute("no equation") is None
