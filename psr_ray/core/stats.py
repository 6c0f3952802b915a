"""Confidence intervals and paired tests for the results tables. Pure: the standard library only.

- `wilson`: the Wilson score interval of a binomial proportion (good coverage at small n and at 0 or n).
- `clopper_pearson`: the exact (conservative) interval, from the binomial distribution itself.
- `mcnemar`: the exact two-sided McNemar test of two classifiers on the same items, i.e. a binomial test with
  p = 1/2 on the discordant items (those exactly one of the two gets right).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

Z95 = 1.959963984540054  # the 97.5% quantile of the standard normal


def wilson(successes: int, n: int, *, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for `successes` out of `n`; (0, 1) when n is 0."""
    if not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def binom_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), summed exactly in floating point."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    return min(1.0, sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1)))


def clopper_pearson(successes: int, n: int, *, alpha: float = 0.05) -> tuple[float, float]:
    """Exact interval: lower = the p with P(X >= k) = alpha/2, upper = the p with P(X <= k) = alpha/2
    (found by bisection to 1e-10); (0, 1) when n is 0."""
    if not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return 0.0, 1.0

    def solve(f, target: float) -> float:  # f increasing in p
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if f(mid) < target else (lo, mid)
        return (lo + hi) / 2

    lower = 0.0 if successes == 0 else solve(lambda p: 1 - binom_cdf(successes - 1, n, p), alpha / 2)
    upper = 1.0 if successes == n else solve(lambda p: -binom_cdf(successes, n, p), -alpha / 2)
    return lower, upper


@dataclass(frozen=True)
class McNemar:
    """The exact McNemar test of `before` against `after` on the same items."""

    only_before: int  # items right before and wrong after
    only_after: int  # items wrong before and right after
    p_value: float  # two-sided exact

    @property
    def discordant(self) -> int:
        return self.only_before + self.only_after


def mcnemar(before: Sequence[bool], after: Sequence[bool]) -> McNemar:
    """Exact two-sided McNemar: p = min(1, 2 * P(X <= min(b, c))), X ~ Binomial(b + c, 1/2)."""
    if len(before) != len(after):
        raise ValueError(f"McNemar needs the same items: {len(before)} vs {len(after)} results")
    b = sum(1 for x, y in zip(before, after, strict=True) if x and not y)
    c = sum(1 for x, y in zip(before, after, strict=True) if y and not x)
    n = b + c
    if n == 0:
        return McNemar(b, c, 1.0)
    # Integer arithmetic: exact for any n (no underflow of 0.5**n).
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))
    return McNemar(b, c, min(1.0, 2 * tail / 2**n))


def format_ci(successes: int, n: int) -> str:
    """`12.3% [9.1, 16.4]`: the share in percent with its 95% Wilson interval."""
    lo, hi = wilson(successes, n)
    share = successes / n if n else 0.0
    return f"{100 * share:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"


def format_p(p: float) -> str:
    """p-values to two significant digits; tiny ones as `<1e-6`."""
    if p < 1e-6:
        return "<1e-6"
    return f"{p:.2g}" if p < 0.01 else f"{p:.3f}"
