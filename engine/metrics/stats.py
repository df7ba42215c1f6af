"""Confidence intervals for reports and Tune: rates (Wilson or Clopper-Pearson) and means (Student t).

Wilson (1927) is the default for rates rather than the normal approximation: recovery rates are
often 0% or 100% on 30 images, where the normal interval collapses to a point. Clopper-Pearson is
the exact (conservative) alternative. Means (CLIP score, target probability) use Student's t with
n - 1 degrees of freedom, since cells are small (tens of images). The numerics are scipy's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from scipy import stats

CONFIDENCE = 0.95


def wilson_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> tuple[float | None, float | None]:
    """Wilson score interval of a binomial rate; (None, None) when n == 0."""
    return _binomial_interval(successes, n, "wilson", confidence)


def clopper_pearson_interval(
    successes: int, n: int, confidence: float = CONFIDENCE
) -> tuple[float | None, float | None]:
    """Exact (Clopper-Pearson) interval of a binomial rate; (None, None) when n == 0."""
    return _binomial_interval(successes, n, "exact", confidence)


def _binomial_interval(successes: int, n: int, method: str, confidence: float) -> tuple[float | None, float | None]:
    if n <= 0:
        return None, None
    if not 0 <= successes <= n:
        raise ValueError(f"successes {successes} outside 0..{n}")
    interval = stats.binomtest(successes, n).proportion_ci(confidence_level=confidence, method=method)
    # At 0 or n successes the bound is exactly 0 or 1; say so rather than leave rounding noise.
    low = 0.0 if successes == 0 else float(interval.low)
    high = 1.0 if successes == n else float(interval.high)
    return low, high


def rate_interval(successes: int, n: int, method: str = "wilson") -> tuple[float | None, float | None]:
    if method == "wilson":
        return wilson_interval(successes, n)
    if method == "clopper_pearson":
        return clopper_pearson_interval(successes, n)
    raise ValueError(f"unknown rate interval {method!r}")


def mean_interval(
    values: Sequence[float], bounds: tuple[float, float] | None = None
) -> tuple[float | None, float | None, float | None]:
    """(mean, low, high): 95% Student-t interval; no interval for fewer than 2 values. With `bounds`
    (e.g. a probability's [0, 1]) the interval is clipped to them: the t interval can overshoot."""
    n = len(values)
    if n == 0:
        return None, None, None
    mean = math.fsum(values) / n
    if n == 1:
        return mean, None, None
    variance = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * math.sqrt(variance / n)
    low, high = mean - half, mean + half
    if bounds is not None:
        low, high = max(bounds[0], low), min(bounds[1], high)
    return mean, low, high


def concept_pooled_interval(
    concept_values: Sequence[float], bounds: tuple[float, float] | None = None
) -> tuple[float | None, float | None, float | None, str | None]:
    """(mean, low, high, why no interval) of a cell pooled over k concepts: the mean of the
    per-concept values with a 95% Student-t interval over the concepts (df = k - 1). Concepts, not
    images, are what varies between erased models (rates go from 0 to 100% by concept), so images
    pooled across concepts are not independent draws. Fewer than 3 concepts give no interval and say why."""
    k = len(concept_values)
    if k == 0:
        return None, None, None, "no concept"
    mean, low, high = mean_interval(list(concept_values), bounds)
    if k < 3:
        return mean, None, None, f"n/a: {k} concept{'s' if k > 1 else ''} (an interval over concepts needs 3)"
    return mean, low, high, None


def ratio_interval(
    numerators: Sequence[float], denominators: Sequence[float], confidence: float = CONFIDENCE
) -> tuple[float | None, float | None, float | None]:
    """(ratio, low, high) of mean(numerators) / mean(denominators) over k paired units (e.g. an
    erased model's and the base model's rate per target concept): the delta method, with a Student-t
    quantile on k - 1 degrees of freedom. No interval for k < 3; no ratio when the denominator's mean is 0."""
    k = len(numerators)
    if k != len(denominators):
        raise ValueError(f"{k} numerators but {len(denominators)} denominators")
    if k == 0:
        return None, None, None
    top, bottom = math.fsum(numerators) / k, math.fsum(denominators) / k
    if bottom == 0:
        return None, None, None
    ratio = top / bottom
    if k < 3:
        return ratio, None, None
    var_top = math.fsum((v - top) ** 2 for v in numerators) / (k - 1)
    var_bottom = math.fsum((v - bottom) ** 2 for v in denominators) / (k - 1)
    covariance = math.fsum((a - top) * (b - bottom) for a, b in zip(numerators, denominators, strict=True)) / (k - 1)
    variance = (var_top - 2 * ratio * covariance + ratio**2 * var_bottom) / (bottom**2 * k)
    half = float(stats.t.ppf(0.5 + confidence / 2, k - 1)) * math.sqrt(max(variance, 0.0))
    return ratio, max(0.0, ratio - half), ratio + half
