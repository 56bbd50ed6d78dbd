"""Statistics of the comparison protocol against hand-computed values and closed forms."""

from __future__ import annotations

import math

import pytest

from pml_plugins.pipeline import stats


def _t_cdf_df3(t: float) -> float:
    """Student's t CDF with 3 degrees of freedom, closed form (independent of scipy)."""
    x = t / math.sqrt(3)
    return 0.5 + (x / (1 + x * x) + math.atan(x)) / math.pi


def test_mean_and_ci95_match_hand_computation():
    # mean 0.2, sample sd 0.1; t_{0.975, 2} = 0.95 / sqrt(2 * 0.975 * 0.025) (closed form for 2 df)
    t2 = 0.95 / math.sqrt(2 * 0.975 * 0.025)
    assert stats.mean([0.1, 0.2, 0.3]) == pytest.approx(0.2)
    assert stats.ci95([0.1, 0.2, 0.3]) == pytest.approx(t2 * 0.1 / math.sqrt(3), rel=1e-9)
    assert stats.ci95([0.1, 0.2, 0.3]) == pytest.approx(0.2484, abs=1e-4)  # the t-table value 4.303
    # two values: t_{0.975, 1} = tan(0.475 pi) (Cauchy), sd = |a - b| / sqrt(2)
    assert stats.ci95([0.5, 0.7]) == pytest.approx(math.tan(0.475 * math.pi) * (0.2 / math.sqrt(2)) / math.sqrt(2))
    assert stats.ci95([0.4, 0.4, 0.4]) == pytest.approx(0.0, abs=1e-12)


def test_one_seed_gives_na_not_a_zero_interval():
    assert math.isnan(stats.ci95([0.42]))
    assert stats.format_mean_ci(0.42, stats.ci95([0.42])) == "42.0 ± n/a"
    assert stats.format_mean_ci(0.4234, 0.0123) == "42.3 ± 1.2"
    assert stats.format_mean_ci(math.nan, math.nan) == "-"
    assert math.isnan(stats.paired_pvalue([0.1], [0.2]))
    assert stats.tied_with_best({"a": [0.3], "b": [0.2]}) == {"a": None, "b": None}


def test_paired_pvalue_matches_closed_form():
    a, b = [1.0, 2.0, 3.0, 4.0], [1.5, 2.1, 3.9, 4.2]
    diff = [x - y for x, y in zip(a, b)]
    m = sum(diff) / 4
    sd = math.sqrt(sum((d - m) ** 2 for d in diff) / 3)
    t = m / (sd / 2)
    assert t == pytest.approx(-2.36507, abs=1e-5)
    expected = 2 * (1 - _t_cdf_df3(abs(t)))
    assert stats.paired_pvalue(a, b) == pytest.approx(expected, rel=1e-9)
    assert stats.paired_pvalue(b, a) == pytest.approx(expected, rel=1e-9)


def test_paired_pvalue_degenerate_differences():
    assert stats.paired_pvalue([0.1, 0.2, 0.3], [0.1, 0.2, 0.3]) == 1.0  # the same numbers
    assert stats.paired_pvalue([0.2, 0.3, 0.4], [0.1, 0.2, 0.3]) == 0.0  # always 0.1 better
    assert math.isnan(stats.paired_pvalue([0.2, math.nan], [0.1, 0.2]))
    with pytest.raises(ValueError, match="same number of values"):
        stats.paired_pvalue([0.1, 0.2], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="at least one"):
        stats.paired_pvalue([], [])


def test_tied_with_best_uses_the_paired_test():
    per_loss = {
        "best": [0.50, 0.60, 0.55, 0.58],
        "close": [0.49, 0.61, 0.53, 0.58],  # differences -0.01, +0.01, -0.02, 0: p ~ 0.50
        "worse": [0.40, 0.50, 0.45, 0.47],  # 0.10-0.11 below at every seed: p < 0.001
        "broken": [math.nan, 0.5, 0.5, 0.5],
    }
    assert stats.paired_pvalue(per_loss["close"], per_loss["best"]) > 0.05
    assert stats.paired_pvalue(per_loss["worse"], per_loss["best"]) < 0.05
    assert stats.tied_with_best(per_loss) == {"best": True, "close": True, "worse": False, "broken": None}
    assert stats.best_of(per_loss) == "best"
    # lower is better (e.g. a loss value): the lowest mean is the best
    assert stats.tied_with_best({"a": [1.0, 2.0], "b": [3.0, 4.0]}, higher_is_better=False)["a"] is True


def test_a_loss_whose_mean_is_lower_but_not_significantly_is_tied():
    """Unpaired intervals would overlap too; the paired test is what the caption names."""
    per_loss = {"a": [0.70, 0.61, 0.66], "b": [0.62, 0.71, 0.65]}
    tied = stats.tied_with_best(per_loss)
    assert tied == {"a": True, "b": True}
    with pytest.raises(ValueError, match="alpha"):
        stats.tied_with_best(per_loss, alpha=1.5)
    with pytest.raises(ValueError, match="confidence"):
        stats.ci95([0.1, 0.2], confidence=1.0)
