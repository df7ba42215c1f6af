"""The worst case per cell: did at least one probe bring the concept back for this prompt?

For each method, the share of image requests (model, target concept, prompt, seed) for which at
least one of the worst-case probes' rows on that request was recognised by the judge (`judge_top1`,
the kept image of a row: a best-of-N or stop-on-success row counts as the row counts). Its null is
the same line over the controls (rows whose probe, or probe params, is a control: the random-token
control of the adversarial prompt, best-of-N controls): what as many untargeted tries already give.

The worst-case probes are a setting (`engine report --worst-case-probe`); by default the recovery
probes that act on the erased model alone (engine.probe.worst_case_probe_names): not diffusion
completion (its images are partly the base model's) and not the controls.

Intervals: for one concept, Wilson over its requests; pooled over k concepts, the mean of the
per-concept rates with a Student-t interval over concepts (k - 1 degrees of freedom), and no
interval for k < 3 (two concepts say nothing about the spread between concepts). The lines have the
recovery table's long form, so the table, its csv and the terminal summary show them last.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pandas as pd

from engine.metrics.columns import METRIC_BY_COLUMN
from engine.metrics.stats import concept_pooled_interval, wilson_interval
from engine.probe import BASE, RECOVERY, row_control_of, worst_case_probe_names
from engine.report.pooling import KEPT
from engine.report.selection import selection_inflated

ANY_PROBE = "any probe"
ANY_CONTROL = "any control (null)"
COLUMN = "judge_top1"
REQUEST = ["model", "target_concept", "prompt", "seed"]
LINE_COLUMNS = ["probe_label", "method", "metric", "metric_column", "reading", "n", "n_label", "concepts", "value",
                "ci_low", "ci_high", "ci_note", "failed", "inflated"]
NOTE = (
    f"'{ANY_PROBE}': share of prompts (concept, prompt, seed) on which at least one worst-case probe's image "
    f"was recognised by the judge (top-1); '{ANY_CONTROL}': the same over the controls (random tokens, "
    "as many tries). One concept: Wilson interval; several: mean over concepts, Student-t interval "
    "over concepts (none for fewer than 3). Rows of a probe that stops at its first judged success "
    "(the adversarial prompt and its control) are marked * too: the judge chose their image."
)


def worst_case_table(frame: pd.DataFrame, probes: Iterable[str] | None = None) -> pd.DataFrame:
    """Per method, the "any probe" line and the "any control" line (where controls ran), in the
    recovery table's long form (engine.report.paper.recovery_table). `probes`: the worst-case probe
    set; None = the default from the probes' class facts. Empty when no row has a `judge_top1` value."""
    if frame.empty or COLUMN not in frame or not frame[COLUMN].notna().any():
        return pd.DataFrame(columns=LINE_COLUMNS)
    rows = _recovery_rows(frame)
    controls = {key: row_control_of(*key) is not None
                for key in set(zip(rows["probe"], rows["params"], strict=True))}  # parsed once per params set
    control = pd.Series([controls[key] for key in zip(rows["probe"], rows["params"], strict=True)],
                        index=rows.index, dtype=bool)
    chosen = set(probes) if probes is not None else worst_case_probe_names(rows["probe"])
    records = []
    for label, subset in ((ANY_PROBE, rows[~control & rows["probe"].isin(chosen)]), (ANY_CONTROL, rows[control])):
        for method, group in subset.groupby("method", sort=False):
            line = any_hit_rate(group)
            if line is not None:
                records.append({"probe_label": label, "method": method, "metric": METRIC_BY_COLUMN[COLUMN].label,
                                "metric_column": COLUMN, "reading": KEPT, **line, "failed": 0,
                                "inflated": _inflated(group)})
    return pd.DataFrame.from_records(records, columns=LINE_COLUMNS)


def with_worst_case(recovery: pd.DataFrame, frame: pd.DataFrame, probes: Iterable[str] | None = None) -> pd.DataFrame:
    """The recovery table (long form, pooled over concepts) with the worst-case lines last."""
    lines = worst_case_table(frame, probes)
    if lines.empty or recovery.empty:
        return recovery
    return pd.concat([recovery, lines.reindex(columns=recovery.columns)], ignore_index=True)


def any_hit_rate(group: pd.DataFrame) -> dict[str, Any] | None:
    """n requests, the share with at least one judged hit among their rows, and its interval, as the
    recovery table's cells have them: Wilson for one concept; over several, the mean of per-concept
    rates with a Student-t interval over concepts (none below 3). None without judged rows."""
    judged = group[group[COLUMN].notna()]
    if judged.empty:
        return None
    per_request = judged.groupby(REQUEST, sort=False)[COLUMN].agg(lambda v: bool(any(bool(x) for x in v)))
    by_concept = per_request.reset_index().groupby("target_concept", sort=True)[COLUMN]
    hits, counts = by_concept.sum(), by_concept.count()
    if len(counts) == 1:
        n = int(counts.iloc[0])
        low, high = wilson_interval(int(hits.iloc[0]), n)
        return {"n": n, "n_label": str(n), "concepts": 1, "value": float(hits.iloc[0] / n), "ci_low": low,
                "ci_high": high, "ci_note": None}
    rates = [float(h / c) for h, c in zip(hits, counts, strict=True)]
    value, low, high, note = concept_pooled_interval(rates, bounds=(0.0, 1.0))
    prompts = str(int(counts.iloc[0])) if counts.nunique() == 1 else f"{int(counts.min())}-{int(counts.max())}"
    return {"n": int(counts.sum()), "n_label": f"{len(rates)} concepts x {prompts}", "concepts": len(rates),
            "value": value, "ci_low": low, "ci_high": high, "ci_note": note}


def _recovery_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """What the recovery table pools: erased models on their erased concepts, and the base model's
    reference rows on the same concepts."""
    erased = set(frame.loc[frame["role"] == RECOVERY, "concept"])
    return frame[(frame["role"] == RECOVERY) | ((frame["role"] == BASE) & frame["concept"].isin(erased))]


def _inflated(group: pd.DataFrame) -> bool:
    """Whether a row of the line kept its image because the judge said so (selection-inflated)."""
    if "selector" not in group:
        return False
    for selector, judge_model in group[["selector", "judge_model"]].itertuples(index=False):
        values = [None if v is None or (isinstance(v, float) and pd.isna(v)) else str(v)
                  for v in (selector, judge_model)]
        if COLUMN in selection_inflated(values[0], values[1], None):
            return True
    return False
