"""Per-item outcomes and paired statistics (``harness.evaluate.outcomes``) against scipy and by hand."""

from __future__ import annotations

import math

import pytest
from scipy import stats

from harness.evaluate.outcomes import across_seeds, paired


def test_paired_difference_by_hand_and_against_scipy():
    a = {"x": 0.0, "y": 1.0, "z": 0.0, "w": 1.0, "only_a": 1.0}
    b = {"x": 1.0, "y": 1.0, "z": 1.0, "w": 0.0, "only_b": 0.0}
    p = paired(a, b)
    # shared items x, y, z, w: differences 1, 0, 1, -1
    assert p.n == 4 and p.mean == pytest.approx(0.25)
    sd = math.sqrt((0.75 ** 2 + 0.25 ** 2 + 0.75 ** 2 + 1.25 ** 2) / 3)
    assert p.se == pytest.approx(sd / 2)
    t = stats.t.ppf(0.975, 3)
    assert (p.low, p.high) == pytest.approx((0.25 - t * sd / 2, 0.25 + t * sd / 2))
    assert not p.significant
    # the same standard error scipy's paired t-test implies (t statistic = mean / se)
    res = stats.ttest_rel([1.0, 1.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0])
    assert p.se == pytest.approx(p.mean / res.statistic)


def test_a_consistent_gain_is_significant_and_smaller_than_unpaired_error():
    base = {str(i): float(i % 7) for i in range(60)}
    better = {k: v + 0.5 + (0.1 if int(k) % 2 else -0.1) for k, v in base.items()}
    p = paired(base, better)
    assert p.significant and p.low > 0 and p.mean == pytest.approx(0.5)
    # the per-iteration standard errors overstate the uncertainty of a paired difference
    unpaired = math.hypot(stats.sem(list(base.values())), stats.sem(list(better.values())))
    assert p.se < unpaired / 10


def test_identical_differences_and_too_few_items():
    assert paired({"a": 1.0}, {"a": 2.0}) is None
    p = paired({"a": 1.0, "b": 2.0}, {"a": 2.0, "b": 3.0})
    assert (p.mean, p.se, p.low, p.high, p.significant) == (1.0, 0.0, 1.0, 1.0, True)


def test_spread_across_seeds():
    s = across_seeds([0.5, 0.6, 0.7])
    assert (s.n, s.mean) == (3, pytest.approx(0.6)) and s.sd == pytest.approx(0.1)
    assert across_seeds([0.4]).sd is None and across_seeds([]) is None
