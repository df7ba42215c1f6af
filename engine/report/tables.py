"""Report tables: rows of one or more runs in, per-cell and pooled statistics out.

The data layer of engine.report: figures and rendering read the cell keys, orderings and the
ReportContent defined here; nothing here draws or renders.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from engine.errors import UserError
from engine.metrics.columns import (
    CANDIDATE_COLUMNS,
    CANDIDATE_HITS,
    METRICS,
    MODEL_COLUMNS,
    SCORE_COLUMNS,
    TOP5_CLASSES,
    TOP5_PROBS,
    Metric,
)
from engine.metrics.stats import mean_interval, rate_interval
from engine.probe import UNPAIRED, baseline_probes
from engine.results import Output, read_rows, require_run_folder, row_columns

logger = logging.getLogger(__name__)

CELL_KEYS = ["model", "method", "concept", "target_concept", "probe", "params"]
BASE_METHOD = "none"  # ModelSpec.method of an un-erased model
# Row roles (column `role`): what a row measures. Runs written before roles existed read as unpaired.
STAT_COLUMNS = [
    "row_id", *CELL_KEYS, "prompt", "prompt_index", "seed", "generation_seconds", "scoring_region",
    *SCORE_COLUMNS, *MODEL_COLUMNS.values(), "selector", "candidate_count", *CANDIDATE_COLUMNS,
]  # fmt: skip
# Read when the run has them (older runs lack them: role reads as unpaired, the others as null).
OPTIONAL_COLUMNS = ["role", CANDIDATE_HITS, TOP5_CLASSES, TOP5_PROBS, "classifier_hash"]
# A cell: its keys plus the label and role derived from them (one role per cell).
CELL_GROUP = [*CELL_KEYS, "probe_label", "role"]


# --------------------------------------------------------------------------- loading


def load_rows(run_dirs: Sequence[Output], single_judge: bool = True) -> pd.DataFrame:
    """Every row of the runs without images, plus `run` and `probe_label` columns. With
    `single_judge`, rows scored by different judge models are refused."""
    frames = []
    for run_dir in run_dirs:
        require_run_folder(run_dir)
        available = row_columns(run_dir)
        columns = STAT_COLUMNS + [c for c in OPTIONAL_COLUMNS if c in available]
        frame = read_rows(run_dir, columns=columns).to_pandas()
        for column in OPTIONAL_COLUMNS[1:]:
            if column not in frame:
                frame[column] = None
        if "role" not in frame:
            frame["role"] = UNPAIRED
        frame["role"] = frame["role"].fillna(UNPAIRED)
        if frame.empty:
            raise UserError(f"{run_dir} holds no readable result rows")
        frame["run"] = str(run_dir)
        frames.append(frame)
    frame = pd.concat(frames, ignore_index=True)
    duplicated = frame["row_id"].duplicated()
    if duplicated.any():
        logger.warning("%d rows appear in more than one run; each is counted once", int(duplicated.sum()))
        frame = frame[~duplicated].reset_index(drop=True)
    for column in MODEL_COLUMNS.values() if single_judge else ():
        models = sorted(frame[column].dropna().unique())
        if len(models) > 1:
            raise UserError(
                f"rows were scored by different judges ({column}: {', '.join(models)}); their numbers are not "
                "comparable: rescore with `engine score RUN_DIR --judge NAME`"
            )
    frame["probe_label"] = probe_labels(frame)
    return frame


FAILURE_COLUMNS = ["row_id", *CELL_KEYS, "prompt", "seed", "role", "error_type", "probe_label"]


def load_failures(run_dirs: Sequence[Output], frame: pd.DataFrame) -> pd.DataFrame:
    """The runs' failed rows (OUTPUT/failures.parquet), without those that have a result row, with
    the probe labels `frame` uses. Rates are over generated rows; tables count these apart."""
    from engine.failures import read_failures

    records = []
    for run_dir in run_dirs:
        for failure in read_failures(run_dir):
            row = failure.row
            records.append({"row_id": row.row_id, "model": row.model, "method": row.method, "concept": row.concept,
                            "target_concept": row.target_concept, "probe": row.probe, "params": row.params,
                            "prompt": row.prompt, "seed": row.seed, "role": row.role or UNPAIRED,
                            "error_type": failure.error_type})
    failures = pd.DataFrame.from_records(records, columns=FAILURE_COLUMNS[:-1])
    failures = failures[~failures["row_id"].isin(set(frame["row_id"]))].drop_duplicates("row_id")
    if failures.empty:
        return failures.assign(probe_label=pd.Series(dtype=str))
    known = dict(zip(zip(frame["probe"], frame["params"], strict=True), frame["probe_label"], strict=True))
    both = pd.concat([frame[["probe", "params"]], failures[["probe", "params"]]], ignore_index=True)
    fallback = dict(zip(zip(both["probe"], both["params"], strict=True), probe_labels(both), strict=True))
    labels = [known.get(key, fallback[key]) for key in zip(failures["probe"], failures["params"], strict=True)]
    return failures.assign(probe_label=labels).reset_index(drop=True)


def probe_labels(frame: pd.DataFrame) -> pd.Series:
    """The probe name, or `name[key=value ...]` with the params that differ when a probe ran with
    several parameter sets (e.g. each kept noise candidate, each completion hand-over step)."""
    if not len(frame):
        return pd.Series([], dtype=str)
    names: dict[tuple[str, str], str] = {}
    for probe, params_texts in frame.groupby("probe")["params"].unique().items():
        parsed = {text: json.loads(text) for text in params_texts}
        keys = sorted({k for p in parsed.values() for k in p})
        varying = [k for k in keys if len({json.dumps(p.get(k), sort_keys=True) for p in parsed.values()}) > 1]
        for text, params in parsed.items():
            if not varying:
                names[(probe, text)] = probe
                continue
            shown = [f"{k}={_short(params.get(k))}" for k in varying]
            names[(probe, text)] = f"{probe}[{' '.join(shown)}]"
    return frame.apply(lambda row: names[(row["probe"], row["params"])], axis=1)


def _short(value: Any) -> str:
    """A one-value sweep list prints as its value."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    return json.dumps(value) if not isinstance(value, (int, float, str)) else str(value)


# --------------------------------------------------------------------------- aggregation


def present_values(series: pd.Series) -> list[Any]:
    return [v for v in series.tolist() if v is not None and not (isinstance(v, float) and pd.isna(v))]


def metric_stats(metric: Metric, group: pd.DataFrame) -> dict[str, Any]:
    """n, value and 95% interval of one metric over a group of rows (its column's non-null values)."""
    values = present_values(group[metric.column])
    if metric.kind == "rate":
        assert metric.hits is not None  # every rate metric has its hits column
        hits = sum(bool(v) for v in values)
        low, high = rate_interval(hits, len(values), metric.interval)
        stats = {metric.hits: hits, metric.value: hits / len(values) if values else None}
    else:
        mean, low, high = mean_interval([float(v) for v in values], metric.bounds)
        stats = {metric.value: mean}
    return {f"{metric.key}_n": len(values), **stats, metric.ci_low: low, metric.ci_high: high}


def _weighted_candidate_mean(group: pd.DataFrame, column: str) -> float | None:
    """Mean over every candidate of the cell: per-row means weighted by their candidate counts."""
    pairs = [
        (float(v), int(c))
        for v, c in zip(group[column].tolist(), group["candidate_count"].tolist(), strict=False)
        if v is not None and not pd.isna(v) and c is not None and not pd.isna(c) and c > 0
    ]
    total = sum(c for _, c in pairs)
    return sum(v * c for v, c in pairs) / total if total else None


def _joined(series: pd.Series) -> str | None:
    return ", ".join(sorted({str(v) for v in present_values(series)})) or None


def group_stats(group: pd.DataFrame) -> dict[str, Any]:
    """All statistics of one group of rows (a cell, or a pooled probe x method group)."""
    counts = [int(c) for c in present_values(group["candidate_count"])]
    stats: dict[str, Any] = {"n": len(group)}
    for metric in METRICS:
        stats.update(metric_stats(metric, group))
    stats["candidate_n"] = sum(counts) if counts else None
    for column in CANDIDATE_COLUMNS:
        stats[column] = _weighted_candidate_mean(group, column)
    stats["seconds_per_image"] = float(group["generation_seconds"].mean())
    stats["selector"] = _joined(group["selector"])
    for column in MODEL_COLUMNS.values():
        stats[column] = _joined(group[column])
    return stats


def cell_stats(frame: pd.DataFrame, failures: pd.DataFrame | None = None) -> pd.DataFrame:
    """One line per cell, keys first, in a stable order; `failed` counts the cell's rows in
    failures.parquet (rates are over generated rows), and a cell whose every row failed has n = 0."""
    keys = CELL_GROUP
    failed_counts = ({} if failures is None or failures.empty
                     else {k: len(g) for k, g in failures.groupby(keys, sort=False, dropna=False)})
    records = [
        {**dict(zip(keys, key, strict=False)), **group_stats(group), "failed": failed_counts.pop(key, 0)}
        for key, group in frame.groupby(keys, sort=True, dropna=False)
    ]
    records += [{**dict(zip(keys, key, strict=False)), "n": 0, "failed": count} for key, count in failed_counts.items()]
    return pd.DataFrame.from_records(records)


def pooled_stats(frame: pd.DataFrame) -> pd.DataFrame:
    """Per (probe_label, method), all rows pooled over concepts and models: what the plots show."""
    records = [
        {"probe_label": probe, "method": method, **group_stats(group)}
        for (probe, method), group in frame.groupby(["probe_label", "method"], sort=True)
    ]
    return pd.DataFrame.from_records(records)


def method_order(methods) -> list[str]:
    """The base model first, then erasure methods alphabetically."""
    methods = sorted(set(methods))
    restricted = [m for m in methods if m.startswith(f"{BASE_METHOD} on ")]  # the base model on fewer concepts
    return ([BASE_METHOD] if BASE_METHOD in methods else []) + restricted + [
        m for m in methods if m != BASE_METHOD and m not in restricted]


def probe_order(labels) -> list[str]:
    """The baseline probe (the plain prompt) first, then the others by name; a probe's parameter
    variants in numeric order (eta=2 before eta=10, v=1.0 before v=1.04), not as text."""
    labels = sorted(set(labels), key=natural_key)
    baselines = baseline_probes(probe_of_label(label) for label in labels)
    first = [label for label in labels if probe_of_label(label) in baselines]
    return first + [label for label in labels if label not in first]


def probe_of_label(label: str) -> str:
    """The probe name a probe label starts with (`noise_based[eta=1.5]` -> `noise_based`, and a
    display label `noise_based control (best of 24 by CLIP)` -> `noise_based`)."""
    return re.split(r"[\[ ]", label, maxsplit=1)[0]


def natural_key(text: str) -> list[tuple[int, float | str]]:
    """Sort key that compares embedded numbers as numbers: 'k=2' < 'k=10', '1.0' < '1.04'."""
    parts = re.split(r"(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)", text)
    return [(0, float(part)) if index % 2 else (1, part) for index, part in enumerate(parts) if part != ""]


def present_metrics(frame: pd.DataFrame) -> list[Metric]:
    """The metrics some judge filled in these rows; the others have no judge behind them."""
    return [m for m in METRICS if frame[m.column].notna().any()]


# --------------------------------------------------------------------------- the report


@dataclass
class ReportContent:
    """Everything the renderers need; paths are inside `output`."""

    output: Path | str  # a local folder, or the URI a remote report was uploaded to
    runs: list[str]
    created_at: str
    rows: int
    judges: list[str]
    frame: pd.DataFrame  # every row, without images
    cells: pd.DataFrame
    failures: pd.DataFrame  # failed rows (failures.parquet) without a result row: counted apart
    paper: pd.DataFrame  # what paper_table.csv holds
    # The report's worst case over probes (engine.report.worst_case); None = the probes' class facts decide.
    worst_case_probes: list[str] | None = None
    # Paths inside `output`; for a report uploaded to an object store, the files' URIs.
    plots: Sequence[tuple[str, Path | str]] = field(default_factory=list)
    sheets: Sequence[tuple[dict[str, Any], Path | str]] = field(default_factory=list)
    paired_sheets: Sequence[tuple[str, Path | str]] = field(default_factory=list)
    # Per cell position: score columns whose best-of-N pick was made by the model that judges them.
    inflated: dict[int, set[str]] = field(default_factory=dict)
    # report.html embeds the sheets (data URIs) while they are small; else it links their files.
    embed_sheets: bool = True


def cell_slug(cell: dict[str, Any]) -> str:
    """A file name per cell: readable keys plus a hash of all of them (params included), so unique."""
    text = "__".join(str(cell[k]) for k in ("model", "concept", "target_concept", "probe_label"))
    digest = hashlib.sha256("\x1f".join(str(cell[k]) for k in CELL_KEYS).encode()).hexdigest()[:8]
    return f"{re.sub(r'[^A-Za-z0-9._-]+', '-', text)[:100]}__{digest}"


def method_label(method: str) -> str:
    if method.startswith(f"{BASE_METHOD} on "):
        return "base model on " + method[len(BASE_METHOD) + 4:]
    return "base model" if method == BASE_METHOD else method
