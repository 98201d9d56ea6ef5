"""The 95% intervals eval and the card report, against their formulas written plainly."""

import math
import random

import pytest

from surgery.base.intervals import (perplexity_interval, perplexity_of, perplexity_ratio_interval, share_interval,
                                    verdict, wilson_interval)


def test_wilson_interval_is_the_closed_form():
    """Wilson (1927): (p̂ + z²/2n ± z·sqrt(p̂(1−p̂)/n + z²/4n²)) / (1 + z²/n), z = 1.96."""
    z = 1.959963984540054
    for k, n in ((0, 30), (3, 30), (15, 30), (30, 30), (7, 50)):
        p = k / n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        low, high = wilson_interval(k, n)
        assert low == pytest.approx(max(0.0, centre - half), abs=1e-12)
        assert high == pytest.approx(min(1.0, centre + half), abs=1e-12)
    assert wilson_interval(0, 30)[0] == 0.0 and wilson_interval(0, 30)[1] == pytest.approx(0.1135, abs=1e-4)


def segments(count: int, seed: int, shift: float = 0.0) -> tuple[list[float], list[int]]:
    rng = random.Random(seed)
    tokens = [128] * count
    return [128 * (2.5 + shift + rng.gauss(0, 0.3)) for _ in range(count)], tokens


def test_perplexity_interval_holds_the_estimate_and_narrows_with_more_segments():
    few, many = segments(8, 0), segments(200, 0)
    for nll, tokens in (few, many):
        low, high = perplexity_interval(nll, tokens)
        assert low < perplexity_of(nll, tokens) < high
    width = lambda data: perplexity_interval(*data)[1] - perplexity_interval(*data)[0]  # noqa: E731
    assert width(many) < width(few) / 3
    assert perplexity_interval(*few) == perplexity_interval(*few)  # seeded: the same every run
    assert perplexity_interval([300.0], [128]) == (perplexity_of([300.0], [128]),) * 2  # one segment: no spread


def test_paired_ratio_sees_a_small_shift_that_unpaired_intervals_hide():
    """The same segments under two models: a uniform 2% NLL shift stands out paired, though the two perplexity
    intervals overlap (segment difficulty varies far more than the shift)."""
    nll, tokens = segments(40, 1)
    worse = [value * 1.02 for value in nll]
    ratio = perplexity_ratio_interval(worse, nll, tokens)
    assert verdict(ratio) == "higher" and ratio[0] > 1.0
    a, b = perplexity_interval(worse, tokens), perplexity_interval(nll, tokens)
    assert a[0] < b[1]  # overlapping: comparing the two intervals would call it no difference
    assert verdict(perplexity_ratio_interval(nll, nll, tokens)) == "no difference at this sample size"


def test_share_interval_is_over_segments():
    hits, totals = [30, 28, 31, 10, 29, 32], [32] * 6
    low, high = share_interval(hits, totals)
    assert low < sum(hits) / sum(totals) < high and high <= 1.0
