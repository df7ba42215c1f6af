"""The paper's tables: recovery and preservation kept apart, each next to the base model.

- Recovery ("does the erased concept come back?"): probes as rows (one line per metric reading;
  best-of-N probes read three ways, engine.report.pooling), methods as columns with the base model
  first; a cell pools that method's models on the concepts they erased (role `recovery`) as the mean
  of per-concept values with an interval over concepts. The base model's column pools its reference
  rows (role `base`) on the same concepts, restricted per method where a method lacks some.
- Preservation ("what did erasure break?"): interference and the standard prompt on concepts a model
  did not erase (role `preservation`), next to the base model's rate on the same requests (each base
  row once), and their ratio with an interval over target concepts.
- Failed rows (failures.parquet) are counted per cell, apart from the rates.
- Per-concept breakdowns of both.
Runs whose models declare no erased concepts (role `unpaired`) get the older table instead: each
probe x method averaged over concepts, which mixes recovery with preservation and says so.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from engine.metrics.columns import Metric
from engine.metrics.stats import ratio_interval
from engine.probe import BASE, PRESERVATION, RECOVERY, UNPAIRED, preservation_probes
from engine.report.best_of_n_labels import display_labels
from engine.report.pooling import KEPT, pooled_record, reading_label, readings
from engine.report.selection import selection_inflated
from engine.report.tables import (
    BASE_METHOD,
    method_order,
    present_metrics,
    present_values,
    probe_order,
)

PAIR_KEYS = ["target_concept", "prompt", "seed"]  # the same image request, whichever model answers it


def has_roles(frame: pd.DataFrame) -> bool:
    return bool(frame["role"].isin([RECOVERY, PRESERVATION]).any())


def erased_concepts(frame: pd.DataFrame) -> set[str]:
    return set(frame.loc[frame["role"] == RECOVERY, "concept"])


def _method_groups(rows: pd.DataFrame, erased: set[str]) -> list[tuple[str, pd.DataFrame]]:
    """(method column label, its rows): each erasure method, and the base model's rows once per
    distinct concept set of the methods beside it, so a method missing some concepts is compared with
    the base model on the same concepts (labelled `none on a, b`)."""
    methods = [m for m in method_order(rows["method"]) if m != BASE_METHOD]
    groups = [(m, rows[rows["method"] == m]) for m in methods]
    base = rows[rows["method"] == BASE_METHOD]
    if base.empty:
        return groups
    sets = {frozenset(group["concept"]) for _, group in groups} or {frozenset(erased)}
    base_groups = []
    for concepts in sorted(sets, key=lambda c: (c != frozenset(erased), sorted(c))):
        label = BASE_METHOD if concepts == frozenset(erased) else f"{BASE_METHOD} on {', '.join(sorted(concepts))}"
        base_groups.append((label, base[base["concept"].isin(concepts)]))
    return base_groups + groups


def _failed_count(failures: pd.DataFrame | None, match: dict[str, Any]) -> int:
    if failures is None or failures.empty:
        return 0
    selected = failures
    for column, value in match.items():
        selected = selected[selected[column] == value]
    return len(selected)


def recovery_table(frame: pd.DataFrame, by_concept: bool = False, failures: pd.DataFrame | None = None) -> pd.DataFrame:
    """Long form: one line per (probe, metric reading, method[, concept]) with n, value and 95%
    interval (engine.report.pooling: over concepts when pooled). Best-of-N probes get their three
    readings and a label naming N and the selector. The base model's lines pool its reference rows
    on the concepts of the methods beside it. `failed`: the cell's rows in failures.parquet."""
    erased = erased_concepts(frame)
    rows = frame[(frame["role"] == RECOVERY) | ((frame["role"] == BASE) & frame["concept"].isin(erased))]
    rows = rows[~rows["probe"].isin(preservation_probes(rows["probe"]))]  # what erasure broke: preservation
    labels = display_labels(rows) if len(rows) else {}
    rows = rows.assign(probe_label=rows["probe_label"].map(labels))
    if failures is not None and len(failures):  # a label no generated row has keeps its own name
        failures = failures.assign(probe_label=failures["probe_label"].map(lambda label: labels.get(label, label)))
    keys = ["probe_label", *(["concept"] if by_concept else [])]
    records = []
    for metric in present_metrics(rows):
        for reading in readings(metric):
            for method, method_rows in _method_groups(rows, erased):
                for key, group in method_rows.groupby(keys, sort=False):
                    stats = pooled_record(group, metric, reading, "concept")
                    if stats is None:
                        continue
                    cell = dict(zip(keys, key if isinstance(key, tuple) else (key,), strict=True))
                    is_base = method == BASE_METHOD or method.startswith(f"{BASE_METHOD} on ")
                    scope = {"method": BASE_METHOD if is_base else method, "role": BASE if is_base else RECOVERY,
                             **cell}
                    failed = sum(_failed_count(failures, {**scope, "concept": c}) for c in set(group["concept"]))
                    records.append({**cell, "method": method, "metric": reading_label(metric, reading),
                                    "metric_column": metric.column, "reading": reading, **stats,
                                    "failed": failed,
                                    "inflated": reading == KEPT and _inflated(group, metric.column)})
    records += _failed_only_lines(failures, records, keys, erased, present_metrics(rows) or present_metrics(frame))
    columns = [*keys, "method", "metric", "metric_column", "reading", "n", "n_label", "concepts", "value",
               "ci_low", "ci_high", "ci_note", "failed", "inflated"]
    return _ordered(pd.DataFrame.from_records(records, columns=columns), by_concept)


def _failed_only_lines(failures: pd.DataFrame | None, records: list[dict[str, Any]], keys: list[str],
                       erased: set[str], metrics: list[Metric]) -> list[dict[str, Any]]:
    """Lines for cells whose every row failed (a method that diverges on every image): no value, the
    failed count, so the cell shows as failed rather than vanishing from the table."""
    if failures is None or failures.empty or not metrics:
        return []
    failed = failures[(failures["role"] == RECOVERY)
                      | ((failures["role"] == BASE) & failures["concept"].isin(erased))]
    failed = failed[~failed["probe"].isin(preservation_probes(failed["probe"]))]
    shown = {(r["method"], *(r[k] for k in keys)) for r in records}
    lines = []
    for key, group in failed.groupby(["method", *keys], sort=False):
        if key in shown:
            continue
        cell = dict(zip(["method", *keys], key, strict=True))
        lines.append({**cell, "metric": reading_label(metrics[0], KEPT), "metric_column": metrics[0].column,
                      "reading": KEPT, "n": 0, "n_label": "0", "concepts": 0, "value": None, "ci_low": None,
                      "ci_high": None, "ci_note": "every row failed", "failed": len(group), "inflated": False})
    return lines


def _inflated(group: pd.DataFrame, column: str) -> bool:
    """Whether any row's value of `column` was picked by the model that judges it (a best-of-N
    selector that is also the judge): such a pooled rate is a maximum, not a sample."""
    for selector, judge_model, clip_model in group[["selector", "judge_model", "clip_model"]].itertuples(index=False):
        values = [None if v is None or (isinstance(v, float) and pd.isna(v)) else str(v)
                  for v in (selector, judge_model, clip_model)]
        if column in selection_inflated(*values):
            return True
    return False


def _per_unit(rows: pd.DataFrame, metric: Metric, unit: list[str]) -> pd.Series:
    """Per unit (a target concept, or one request), the mean of the metric's present values."""
    values = rows[[*unit, metric.column]].dropna(subset=[metric.column])
    return values.assign(v=values[metric.column].astype(float)).groupby(unit)["v"].mean()


def preservation_table(
    frame: pd.DataFrame, by_concept: bool = False, failures: pd.DataFrame | None = None
) -> pd.DataFrame:
    """Per (method, probe, metric[, target concept]): the erased models' rate on concepts they did not
    erase, the base model's rate on the same requests (each base row once), and the ratio erased / base
    with an interval. Pooled over target concepts: mean of per-target values, t interval over targets."""
    kept = frame[frame["role"] == PRESERVATION]
    base = frame[(frame["method"] == BASE_METHOD) & frame["probe"].isin(set(kept["probe"]))]  # like with like
    base = base.drop_duplicates(["probe", *PAIR_KEYS])
    keys = ["method", "probe_label", *(["target_concept"] if by_concept else [])]
    records = []
    for metric in present_metrics(kept):
        for key, group in kept.groupby(keys, sort=False):
            requests = group[["probe", *PAIR_KEYS]].drop_duplicates()
            base_rows = base.merge(requests, on=["probe", *PAIR_KEYS], how="inner")  # each base request once
            erased_side = pooled_record(group, metric, KEPT, "target_concept")
            if erased_side is None:
                continue
            base_side = pooled_record(base_rows, metric, KEPT, "target_concept") if len(base_rows) else None
            # The ratio's unit: target concepts when pooled, else the requests (prompt, seed) of the one target.
            unit = ["target_concept"] if erased_side["concepts"] > 1 else PAIR_KEYS
            paired = pd.concat([_per_unit(group, metric, unit).rename("erased"),
                                _per_unit(base_rows, metric, unit).rename("base")], axis=1, join="inner")
            ratio, ratio_low, ratio_high = ratio_interval(paired["erased"].tolist(), paired["base"].tolist())
            cell = dict(zip(keys, key, strict=False))
            failed = _failed_count(failures, {"role": PRESERVATION, **cell})
            records.append({
                **cell, "metric": metric.label, "metric_column": metric.column,
                **{k: erased_side[k] for k in ("n", "n_label", "value", "ci_low", "ci_high", "ci_note")},
                "failed": failed,
                "base_n": None if base_side is None else base_side["n"],
                "base_value": None if base_side is None else base_side["value"],
                "base_ci_low": None if base_side is None else base_side["ci_low"],
                "base_ci_high": None if base_side is None else base_side["ci_high"],
                "ratio_to_base": ratio, "ratio_ci_low": ratio_low, "ratio_ci_high": ratio_high,
            })  # fmt: skip
    columns = [*keys, "metric", "metric_column", "n", "n_label", "value", "ci_low", "ci_high", "ci_note", "failed",
               "base_n", "base_value", "base_ci_low", "base_ci_high", "ratio_to_base", "ratio_ci_low", "ratio_ci_high"]
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
    """Methods as columns (base first), each cell a dict: value, low, high (scaled for display), n
    label, why no interval, failed rows, and whether selection inflated it."""
    if table.empty:
        return pd.DataFrame(columns=index)
    methods = method_order(table["method"])
    records = []
    for key, group in table.groupby(index, sort=False):
        record = dict(zip(index, key if isinstance(key, tuple) else (key,), strict=False))
        scale = scale_of[group["metric_column"].iloc[0]]
        for _, line in group.iterrows():
            value, low, high = (None if pd.isna(v) else v * scale
                                for v in (line["value"], line["ci_low"], line["ci_high"]))
            record[line["method"]] = {
                "value": value, "low": low, "high": high, "n": line.get("n_label"),
                "note": None if pd.isna(line.get("ci_note")) else line.get("ci_note"),
                "failed": int(line.get("failed") or 0), "inflated": bool(line.get("inflated", False)),
            }
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
