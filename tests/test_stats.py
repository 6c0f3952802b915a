"""Confidence intervals and McNemar against hand-computed values."""

from __future__ import annotations

import pytest

from psr_ray.core.stats import binom_cdf, clopper_pearson, format_ci, format_p, mcnemar, wilson


def test_wilson_hand_values():
    # 0/10: centre = half = (z^2/20) / (1 + z^2/10) = 0.192073 / 1.384146 = 0.138767.
    assert wilson(0, 10) == pytest.approx((0.0, 0.277533), abs=1e-6)
    # 5/10: centre 0.5, half = z * sqrt(0.025 + z^2/400) / (1 + z^2/10) = 0.263407.
    assert wilson(5, 10) == pytest.approx((0.236593, 0.763407), abs=1e-6)
    assert wilson(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="successes"):
        wilson(11, 10)


def test_clopper_pearson_hand_values():
    # 0/10: upper solves (1 - p)^10 = 0.025, p = 1 - 0.025^(1/10).
    assert clopper_pearson(0, 10) == pytest.approx((0.0, 1 - 0.025**0.1), abs=1e-9)
    # 10/10 mirrors it.
    assert clopper_pearson(10, 10) == pytest.approx((0.025**0.1, 1.0), abs=1e-9)
    lo, hi = clopper_pearson(5, 10)
    assert 1 - binom_cdf(4, 10, lo) == pytest.approx(0.025, abs=1e-9)
    assert binom_cdf(5, 10, hi) == pytest.approx(0.025, abs=1e-9)
    assert (round(lo, 4), round(hi, 4)) == (0.1871, 0.8129)


def test_mcnemar_exact_binomial_on_discordant_items():
    before = [False] * 6 + [True] * 4
    after = [True] * 6 + [True] * 4
    result = mcnemar(before, after)
    # 6 discordant, all improved: p = 2 * (1/2)^6.
    assert (result.only_before, result.only_after, result.p_value) == (0, 6, 0.03125)
    # 1 vs 9: p = 2 * (C(10,0) + C(10,1)) / 2^10 = 22 / 1024.
    result = mcnemar([True] + [False] * 9 + [True] * 5, [False] + [True] * 9 + [True] * 5)
    assert (result.only_before, result.only_after, result.p_value) == (1, 9, 22 / 1024)
    assert mcnemar([True, False], [False, True]).p_value == 1.0
    assert mcnemar([True, True], [True, True]).p_value == 1.0
    with pytest.raises(ValueError, match="same items"):
        mcnemar([True], [True, False])


def test_formatting():
    assert format_ci(5, 10) == "50.0% [23.7, 76.3]"
    assert format_p(0.03125) == "0.031"
    assert format_p(0.0021484375) == "0.0021"
    assert format_p(1e-9) == "<1e-6"
