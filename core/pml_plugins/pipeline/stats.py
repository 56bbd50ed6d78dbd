"""Statistics for comparisons over seeds: means, 95 % t-intervals, paired tests, ties with the best.

With one seed there is no spread to estimate: intervals and p-values are NaN and shown as "n/a",
never as a zero-width interval. Everything here is plain numbers in, numbers out; the protocol
(:mod:`pml_plugins.pipeline.protocol`) decides what a "unit" is (a seed, or a seed's fold average).
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import numpy as np

#: the method named in every comparison caption
TEST_NAME = "two-sided paired t-test over seeds (scipy.stats.ttest_rel)"
NA = "n/a"


def _values(values: Sequence[float], name: str = "values") -> np.ndarray:
    arr = np.asarray(list(values), dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise ValueError(f"{name} must hold at least one number")
    return arr


def mean(values: Sequence[float]) -> float:
    """The arithmetic mean (NaN values propagate: a failed run is not silently dropped)."""
    return float(np.mean(_values(values)))


def ci95(values: Sequence[float], confidence: float = 0.95) -> float:
    """Half-width of the two-sided ``confidence`` t-interval of the mean: ``t_{n-1} * s / sqrt(n)``
    (``s`` the sample standard deviation); NaN for a single value."""
    from scipy import stats

    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    arr = _values(values)
    n = arr.size
    if n < 2:
        return math.nan
    sd = float(np.std(arr, ddof=1))
    return float(stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n))


def paired_pvalue(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of the paired t-test of ``a`` against ``b`` (same seeds, same order).

    NaN with fewer than two pairs. Differences that are all equal have no spread, where scipy
    answers NaN: 1.0 when they are all zero (the same numbers), 0.0 otherwise (every pair differs
    by the same amount, the strongest evidence a t-test can see)."""
    from scipy import stats

    x, y = _values(a, "a"), _values(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"a paired test needs the same number of values on both sides, got {x.size} and {y.size}")
    if x.size < 2 or np.isnan(x).any() or np.isnan(y).any():
        return math.nan
    diff = x - y
    if np.allclose(diff, diff[0], rtol=0, atol=1e-12):
        return 1.0 if abs(diff[0]) <= 1e-12 else 0.0
    return float(stats.ttest_rel(x, y).pvalue)


def tied_with_best(
    per_loss: Mapping[str, Sequence[float]], alpha: float = 0.05, higher_is_better: bool = True
) -> dict[str, Optional[bool]]:
    """For each loss, whether its values are statistically indistinguishable from the best loss's.

    The best is the highest mean (lowest with ``higher_is_better=False``); it is tied with itself.
    Another loss is tied when the paired test against the best gives ``p >= alpha``. ``None`` (shown
    "n/a") where there is nothing to test: one seed, or a loss without values. Losses must share
    the same seeds in the same order (the protocol pairs runs by seed).
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    arrays = {k: _values(v, k) for k, v in per_loss.items() if len(v)}
    valid = {k: v for k, v in arrays.items() if not np.isnan(v).any()}
    out: dict[str, Optional[bool]] = {k: None for k in per_loss}
    if not valid:
        return out
    sign = 1.0 if higher_is_better else -1.0
    best = max(valid, key=lambda k: sign * float(np.mean(valid[k])))
    for name, values in valid.items():
        if name == best:
            out[name] = True if values.size >= 2 else None
            continue
        p = paired_pvalue(values, valid[best])
        out[name] = None if math.isnan(p) else bool(p >= alpha)
    return out


def best_of(per_loss: Mapping[str, Sequence[float]], higher_is_better: bool = True) -> Optional[str]:
    """The loss with the highest (lowest) mean among those without NaN; None when none."""
    valid = {
        k: float(np.mean(_values(v, k)))
        for k, v in per_loss.items()
        if len(v) and not np.isnan(np.asarray(v, dtype=float)).any()
    }
    if not valid:
        return None
    return max(valid, key=lambda k: valid[k] if higher_is_better else -valid[k])


def format_mean_ci(m: float, half: float, scale: float = 100.0, digits: int = 1) -> str:
    """``"27.3 ± 1.2"``; ``"27.3 ± n/a"`` with one seed; ``"-"`` when the mean is NaN."""
    if m is None or math.isnan(m):
        return "-"
    if half is None or math.isnan(half):
        return f"{scale * m:.{digits}f} ± {NA}"
    return f"{scale * m:.{digits}f} ± {scale * half:.{digits}f}"
