"""The held-out metric's fixed subsample (trainer/heldout.py): its size from the CI it must give, and the same
pairs whatever the order they come in, the fit or the seed."""

from __future__ import annotations

import math
import random

import pytest

from psr_ray.trainer.heldout import Z_95, heldout_subsample, pairs_for_ci


def rows(n: int) -> list[dict]:
    return [{"question": f"q{i}", "prefix": "", "step_index": 1, "chosen": f"{i}", "rejected": f"{i + 1}"}
            for i in range(n)]  # fmt: skip


def test_pairs_for_ci_is_the_worst_case_binomial_size():
    assert pairs_for_ci(0.1) == 97  # 1.96^2 / (4 * 0.01) = 96.04
    assert pairs_for_ci(0.05) == 385 and pairs_for_ci(0.0) == 0
    for h in (0.03, 0.1, 0.2):
        n = pairs_for_ci(h)
        # n gives +-h at p = 1/2 (the widest interval), n - 1 does not.
        assert Z_95 * math.sqrt(0.25 / n) <= h < Z_95 * math.sqrt(0.25 / (n - 1))


def test_subsample_is_fixed_across_fits_orders_and_seeds():
    pairs = rows(131)  # the held-out pairs the issue measured
    first = heldout_subsample(pairs, half_width=0.1)
    assert len(first) == 97 and all(row in pairs for row in first)
    for seed in range(5):  # another fit, another run seed: the pairs arrive in another order
        shuffled = pairs[:]
        random.Random(seed).shuffle(shuffled)
        assert heldout_subsample(shuffled, half_width=0.1) == first
    # Not simply the first rows: the digest picks, and a wider interval keeps a prefix of the same ranking.
    assert first != pairs[:97]
    assert heldout_subsample(pairs, half_width=0.2) == first[: pairs_for_ci(0.2)]


@pytest.mark.parametrize("half_width", [0.0, 0.1])
def test_fewer_pairs_than_the_ci_needs_are_all_taken(half_width):
    pairs = rows(40)
    got = heldout_subsample(pairs, half_width=half_width)
    assert sorted(r["question"] for r in got) == sorted(r["question"] for r in pairs)
