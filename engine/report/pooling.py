"""Statistics of one table cell, on the unit that varies, and the three readings of best-of-N rows.

A cell over one concept is a sample of prompts: a Wilson interval for a rate (t for a mean) over its
rows. A cell pooled over k concepts (a method's recovery over the concepts its models erased) is the
mean of the per-concept values with a Student-t interval over the k concepts (engine.metrics.stats.
concept_pooled_interval): concepts, not images, are what varies between erased models.

Best-of-N rows are read three ways (READINGS):
- `kept`: the candidate the selector kept (the row's own score);
- `all`: the mean over every candidate of the row (what one sample gives; `candidate_*` columns);
- `any`: whether some candidate of the row was recognised (the upper bound; `candidate_hits`).
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from engine.metrics.columns import CANDIDATE_HITS, HIT_METRIC, Metric
from engine.metrics.stats import concept_pooled_interval, mean_interval, rate_interval

KEPT, ALL, ANY = "kept", "all", "any"
READINGS = (KEPT, ALL, ANY)
READING_SUFFIX = {KEPT: "", ALL: ", all candidates", ANY: ", any candidate (upper bound)"}


def readings(metric: Metric) -> list[str]:
    """The readings a metric has: every metric its kept value; one with a per-row candidate mean also
    the all-candidates value; the hit metric also the any-candidate value."""
    return [KEPT, *([ALL] if metric.candidate_column else []), *([ANY] if metric.column == HIT_METRIC else [])]


def reading_label(metric: Metric, reading: str) -> str:
    return metric.label + READING_SUFFIX[reading]


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and pd.isna(value))


def _any_hit(hits: Any) -> bool | None:
    if hits is None or (isinstance(hits, float) and pd.isna(hits)):
        return None
    hits = list(hits)
    return any(bool(h) for h in hits) if hits else None


def reading_values(group: pd.DataFrame, metric: Metric, reading: str) -> pd.Series:
    """One value per row (None where the row has none): the kept score, the row's mean over its
    candidates, or whether any candidate hit."""
    if reading == KEPT:
        return group[metric.column]
    if reading == ALL:
        return group[metric.candidate_column] if metric.candidate_column in group else pd.Series(dtype=float)
    if CANDIDATE_HITS not in group:
        return pd.Series(dtype=object)
    return group[CANDIDATE_HITS].map(_any_hit)


def _is_rate(metric: Metric, reading: str) -> bool:
    """Per-row booleans (Wilson): a rate's kept value and the any-candidate hit; a rate's all-candidates
    value is a per-row share, averaged with a t interval."""
    return metric.kind == "rate" and reading in (KEPT, ANY)


def _bounds(metric: Metric) -> tuple[float, float] | None:
    return (0.0, 1.0) if metric.kind == "rate" else metric.bounds


def single_interval(values: list[Any], metric: Metric, reading: str) -> tuple[float | None, float | None, float | None]:
    """(value, low, high) over the rows of one concept."""
    if _is_rate(metric, reading):
        hits = sum(bool(v) for v in values)
        low, high = rate_interval(hits, len(values), metric.interval)
        return (hits / len(values) if values else None), low, high
    return mean_interval([float(v) for v in values], _bounds(metric))


def _concept_value(values: list[Any], metric: Metric, reading: str) -> float:
    value = single_interval(values, metric, reading)[0]
    if value is None:  # a concept is only listed with at least one value
        raise ValueError("a concept with values has no value")
    return value


def pooled_record(group: pd.DataFrame, metric: Metric, reading: str, concept_column: str) -> dict[str, Any] | None:
    """n, its label, value, 95% interval and why there is none, over `group`'s rows; None when no row
    has a value. Several concepts (`concept_column`) are pooled as the mean of per-concept values."""
    values = reading_values(group, metric, reading)
    per_concept: dict[str, list[Any]] = {}
    for concept, value in zip(group[concept_column].tolist(), values.tolist(), strict=True):
        if _present(value):
            per_concept.setdefault(str(concept), []).append(value)
    if not per_concept:
        return None
    counts = [len(v) for v in per_concept.values()]
    if len(per_concept) == 1:
        value, low, high = single_interval(next(iter(per_concept.values())), metric, reading)
        return {"n": counts[0], "n_label": str(counts[0]), "concepts": 1, "value": value, "ci_low": low,
                "ci_high": high, "ci_note": None}
    concept_values = [_concept_value(v, metric, reading) for v in per_concept.values()]
    value, low, high, note = concept_pooled_interval(concept_values, _bounds(metric))
    prompts = str(counts[0]) if len(set(counts)) == 1 else f"{min(counts)}-{max(counts)}"
    return {"n": sum(counts), "n_label": f"{len(per_concept)} concepts x {prompts}", "concepts": len(per_concept),
            "value": value, "ci_low": low, "ci_high": high, "ci_note": note}
