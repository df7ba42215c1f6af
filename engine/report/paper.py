"""The paper's tables: recovery and preservation kept apart, each next to the base model.

- Recovery ("does the erased concept come back?"): probes as rows (one line per metric), methods as
  columns with the base model first; a cell pools every row of that method's models on the concepts
  they erased (role `recovery`), with its 95% interval. The base model's column pools its reference
  rows (role `base`) on the same concepts.
- Preservation ("what did erasure break?"): interference and the standard prompt on concepts a model
  did not erase (role `preservation`), next to the base model's rate on the same prompts and seeds,
  and their ratio.
- Per-concept breakdowns of both.
Runs whose models declare no erased concepts (role `unpaired`) get the older table instead: each
probe x method averaged over concepts, which mixes recovery with preservation and says so.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from engine.metrics.columns import Metric
from engine.probe import BASE, PRESERVATION, RECOVERY, UNPAIRED, preservation_probes
from engine.report.selection import selection_inflated
from engine.report.tables import (
    BASE_METHOD,
    method_order,
    metric_stats,
    present_metrics,
    present_values,
    probe_order,
)

PAIR_KEYS = ["target_concept", "prompt", "seed"]  # the same image request, whichever model answers it


def has_roles(frame: pd.DataFrame) -> bool:
    return bool(frame["role"].isin([RECOVERY, PRESERVATION]).any())


def _interval_record(metric: Metric, group: pd.DataFrame) -> dict[str, Any]:
    stats = metric_stats(metric, group)
    return {"n": stats[f"{metric.key}_n"], "value": stats[metric.value], "ci_low": stats[metric.ci_low],
            "ci_high": stats[metric.ci_high]}


def erased_concepts(frame: pd.DataFrame) -> set[str]:
    return set(frame.loc[frame["role"] == RECOVERY, "concept"])


def recovery_table(frame: pd.DataFrame, by_concept: bool = False) -> pd.DataFrame:
    """Long form: one line per (probe, metric, method[, concept]) with n, value and 95% interval.
    The base model's line pools its reference rows on the concepts some model erased."""
    erased = erased_concepts(frame)
    rows = frame[(frame["role"] == RECOVERY) | ((frame["role"] == BASE) & frame["concept"].isin(erased))]
    rows = rows[~rows["probe"].isin(preservation_probes(rows["probe"]))]  # what erasure broke: preservation
    keys = ["probe_label", "method", *(["concept"] if by_concept else [])]
    records = []
    for metric in present_metrics(rows):
        for key, group in rows.groupby(keys, sort=False):
            if not present_values(group[metric.column]):
                continue
            records.append({**dict(zip(keys, key, strict=True)), "metric": metric.label,
                            "metric_column": metric.column,
                            **_interval_record(metric, group), "inflated": _inflated(group, metric.column)})
    return _ordered(pd.DataFrame.from_records(records, columns=[*keys, "metric", "metric_column", "n", "value",
                                                                 "ci_low", "ci_high", "inflated"]), by_concept)


def _inflated(group: pd.DataFrame, column: str) -> bool:
    """Whether any row's value of `column` was picked by the model that judges it (a best-of-N
    selector that is also the judge): such a pooled rate is a maximum, not a sample."""
    for selector, judge_model, clip_model in group[["selector", "judge_model", "clip_model"]].itertuples(index=False):
        values = [None if v is None or (isinstance(v, float) and pd.isna(v)) else str(v)
                  for v in (selector, judge_model, clip_model)]
        if column in selection_inflated(*values):
            return True
    return False


def preservation_table(frame: pd.DataFrame, by_concept: bool = False) -> pd.DataFrame:
    """Per (method, probe, metric[, target concept]): the erased models' rate on concepts they did not
    erase, the base model's rate on the same prompts and seeds, and the ratio erased / base."""
    kept = frame[frame["role"] == PRESERVATION]
    base = frame[(frame["method"] == BASE_METHOD) & frame["probe"].isin(set(kept["probe"]))]  # like with like
    base = base.drop_duplicates(PAIR_KEYS)
    keys = ["method", "probe_label", *(["target_concept"] if by_concept else [])]
    records = []
    for metric in present_metrics(kept):
        for key, group in kept.groupby(keys, sort=False):
            paired = group.merge(base[[*PAIR_KEYS, metric.column]], on=PAIR_KEYS, how="left", suffixes=("", "_base"))
            erased_side = _interval_record(metric, group)
            base_side = _interval_record(metric, paired.rename(columns={
                metric.column: "_erased", f"{metric.column}_base": metric.column}))
            ratio = (erased_side["value"] / base_side["value"]
                     if erased_side["value"] is not None and base_side["value"] else None)
            records.append({
                **dict(zip(keys, key, strict=False)), "metric": metric.label, "metric_column": metric.column,
                **erased_side, "base_n": base_side["n"], "base_value": base_side["value"],
                "base_ci_low": base_side["ci_low"], "base_ci_high": base_side["ci_high"], "ratio_to_base": ratio,
            })  # fmt: skip
    columns = [*keys, "metric", "metric_column", "n", "value", "ci_low", "ci_high", "base_n", "base_value",
               "base_ci_low", "base_ci_high", "ratio_to_base"]
    table = pd.DataFrame.from_records(records, columns=columns)
    if table.empty:
        return table
    methods = {m: i for i, m in enumerate(method_order(table["method"]))}
    probes = {p: i for i, p in enumerate(probe_order(table["probe_label"]))}
    return table.sort_values(
        ["method", "probe_label", *(["target_concept"] if by_concept else []), "metric"],
        key=lambda s: s.map(methods) if s.name == "method" else s.map(probes) if s.name == "probe_label" else s,
    ).reset_index(drop=True)


def _ordered(table: pd.DataFrame, by_concept: bool) -> pd.DataFrame:
    if table.empty:
        return table
    probes = {p: i for i, p in enumerate(probe_order(table["probe_label"]))}
    methods = {m: i for i, m in enumerate(method_order(table["method"]))}
    metrics = {label: i for i, label in enumerate(dict.fromkeys(table["metric"]))}
    columns = [*(["concept"] if by_concept else []), "probe_label", "metric", "method"]
    order = {"probe_label": probes, "method": methods, "metric": metrics}
    return table.sort_values(columns, key=lambda s: s.map(order[s.name]) if s.name in order else s).reset_index(
        drop=True
    )


def wide(table: pd.DataFrame, index: list[str], scale_of: dict[str, float]) -> pd.DataFrame:
    """Methods as columns (base first), each holding (value, low, high) scaled for display."""
    if table.empty:
        return pd.DataFrame(columns=index)
    methods = method_order(table["method"])
    records = []
    for key, group in table.groupby(index, sort=False):
        record = dict(zip(index, key if isinstance(key, tuple) else (key,), strict=False))
        scale = scale_of[group["metric_column"].iloc[0]]
        for _, line in group.iterrows():
            record[line["method"]] = tuple(None if pd.isna(v) else v * scale
                                           for v in (line["value"], line["ci_low"], line["ci_high"]))
            if line.get("inflated", False):
                record[line["method"]] += ("inflated",)
        records.append(record)
    return pd.DataFrame.from_records(records, columns=[*index, *methods])


def mean_over_concepts_table(cells: pd.DataFrame) -> pd.DataFrame:
    """For runs without erased concepts: probes x metrics by methods, the mean over a probe-method's
    cells (i.e. over concepts) of each cell's value, rates in %, all-candidates rows for best-of-N."""
    from engine.metrics.columns import METRICS

    unpaired = cells[cells["role"] == UNPAIRED] if "role" in cells else cells
    methods = method_order(unpaired["method"])
    rows = []
    for probe in probe_order(unpaired["probe_label"]):
        probe_cells = unpaired[unpaired["probe_label"] == probe]
        lines = [(m.label, m.value, m.scale) for m in METRICS if m.plotted]
        if probe_cells["candidate_n"].notna().any():
            lines += [(f"{m.label}, all candidates", m.candidate_column, m.scale) for m in METRICS
                      if m.candidate_column]
        for label, column, scale in lines:
            row: dict[str, Any] = {"probe": probe, "metric": label}
            for method in methods:
                values = [float(v) for v in present_values(probe_cells.loc[probe_cells["method"] == method, column])]
                row[method] = sum(values) / len(values) * scale if values else None
            rows.append(row)
    return pd.DataFrame(rows, columns=["probe", "metric", *methods])
