"""Labelled judge pairs and their scoring: pure, exact values."""

from __future__ import annotations

import random

import pytest

from psr_ray.engines.api import JudgeRequest, Judgment
from psr_ray.init_data.labelled import (
    LabelledPair,
    build_corrupted_pairs,
    corrupt_one_number,
    judge_requests,
    score_judgments,
    solution_steps,
)

ROWS = [
    {"question": " Q1? ", "answer": "He buys 2*3=<<2*3=6>>6 apples.\nThen 6+4=<<6+4=10>>10 in all.\n#### 10"},
    {"question": "Q2", "answer": "No numbers here.\n#### 0"},
    {"question": "Q3", "answer": "It costs $1,200 and 2.5 more.\nSo 7 left.\n#### 7"},
]


def test_solution_steps_strips_calculator_annotations_and_the_answer_line():
    assert solution_steps(ROWS[0]["answer"]) == ["He buys 2*3=6 apples.", "Then 6+4=10 in all."]
    assert solution_steps("a\n\n  b  \n#### 3") == ["a", "b"]


def test_build_corrupted_pairs_exact():
    assert build_corrupted_pairs(ROWS, 5, 0) == [
        LabelledPair("Q1?", "Step 1: He buys 2*3=6 apples.\n", "Then 6+4=10 in all.", "Then 6+3=10 in all."),
        # Row 2 has no integer; in row 3 `1,200` and `2.5` are never touched, only the plain `7`.
        LabelledPair("Q3", "Step 1: It costs $1,200 and 2.5 more.\n", "So 7 left.", "So 12 left."),
    ]
    assert build_corrupted_pairs(ROWS, 5, 3) == [
        LabelledPair("Q1?", "", "He buys 2*3=6 apples.", "He buys 2*3=15 apples."),
        LabelledPair("Q3", "Step 1: It costs $1,200 and 2.5 more.\n", "So 7 left.", "So 8 left."),
    ]


def test_build_corrupted_pairs_stops_at_num_pairs_and_is_deterministic():
    assert build_corrupted_pairs(ROWS, 1, 0) == build_corrupted_pairs(ROWS, 5, 0)[:1]
    assert build_corrupted_pairs(ROWS, 5, 7) == build_corrupted_pairs(ROWS, 5, 7)


def test_corrupt_one_number():
    rng = random.Random(1)
    assert [corrupt_one_number("5 apples", rng) for _ in range(4)] == ["3 apples", "13 apples", "1 apples", "12 apples"]
    assert corrupt_one_number("0", random.Random(0)) == "7"  # never negative
    assert corrupt_one_number("1,000 and 2.5", random.Random(0)) is None


def test_judge_requests_both_orders():
    pair = LabelledPair("q", "p", "good", "bad")
    requests, labels = judge_requests([pair])
    assert requests == [JudgeRequest("q", "p", "good", "bad"), JudgeRequest("q", "p", "bad", "good")]
    assert labels == ["A", "B"]


def _judgment(verdict: str, prob_a: float) -> Judgment:
    return Judgment(verdict, prob_a, "", 1, 0)


def test_score_judgments():
    # Pair 1: both orders right. Pair 2: position bias, but mean P(good) (0.8 + 0.4) / 2 = 0.6 wins.
    # Pair 3: unparseable then wrong: mean (0.5 + 0.3) / 2 = 0.4 loses.
    judgments = [
        *(_judgment("A", 0.9), _judgment("B", 0.2)),
        *(_judgment("A", 0.8), _judgment("A", 0.6)),
        *(_judgment("unparseable", 0.5), _judgment("A", 0.7)),
    ]
    scores = score_judgments(judgments, ["A", "B"] * 3)
    assert scores.num_judgments == 6
    assert scores.accuracy == pytest.approx(3 / 6)
    assert scores.parse_rate == pytest.approx(5 / 6)
    assert scores.pair_accuracy == pytest.approx(2 / 3)
    assert scores.share_a == pytest.approx(4 / 5)
    with pytest.raises(ValueError, match="pairs of orders"):
        score_judgments(judgments[:3], ["A", "B", "A"])


def test_likelihood_scores_become_the_judgments_of_both_orders():
    import math

    from psr_ray.init_data.labelled import likelihood_judgments

    # Pairs (good, bad): right by log 3 nats; wrong; equal; the bad step unscored; neither scored.
    scores = [-1.0, -1.0 - math.log(3.0), -2.0, -1.0, -1.5, -1.5, -1.0, -math.inf, -math.inf, -math.inf]
    judgments = likelihood_judgments(scores, policy_version=4)
    assert [(j.verdict, round(j.prob_a, 6)) for j in judgments] == [
        ("A", 0.75), ("B", 0.25),  # P(A) = exp(s_A) / (exp(s_A) + exp(s_B))
        ("B", round(1 / (1 + math.e), 6)), ("A", round(math.e / (1 + math.e), 6)),
        ("unparseable", 0.5), ("unparseable", 0.5),
        ("A", 1.0), ("B", 0.0),
        ("unparseable", 0.5), ("unparseable", 0.5),
    ]  # fmt: skip
    assert all(j.policy_version == 4 and j.num_tokens == 0 for j in judgments)
    pairs = [LabelledPair("q", "", "g", "b")] * 5
    scores_ = score_judgments(judgments, judge_requests(pairs)[1])
    # Two of five pairs right; no position: share A is exactly one half of the parsed verdicts.
    assert (scores_.num_pairs_right, scores_.pair_accuracy, scores_.num_right, scores_.share_a) == (2, 0.4, 4, 0.5)
    with pytest.raises(ValueError, match="a good and a bad score per pair"):
        likelihood_judgments([-1.0])
