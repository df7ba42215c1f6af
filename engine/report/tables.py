"""Report tables: rows of one or more runs in, per-cell and pooled statistics out.

The data layer of engine.report: figures and rendering read the cell keys, orderings and the
ReportContent defined here; nothing here draws or renders.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from engine.errors import UserError
from engine.metrics.columns import CANDIDATE_COLUMNS, METRICS, MODEL_COLUMNS, SCORE_COLUMNS, Metric
from engine.metrics.stats import mean_interval, rate_interval
from engine.probe import UNPAIRED, baseline_probes
from engine.results import read_rows, require_run_folder, row_columns

logger = logging.getLogger(__name__)

CELL_KEYS = ["model", "method", "concept", "target_concept", "probe", "params"]
BASE_METHOD = "none"  # ModelSpec.method of an un-erased model
# Row roles (column `role`): what a row measures. Runs written before roles existed read as unpaired.
STAT_COLUMNS = [
    "row_id", *CELL_KEYS, "prompt", "prompt_index", "seed", "generation_seconds", "scoring_region",
    *SCORE_COLUMNS, *MODEL_COLUMNS.values(), "selector", "candidate_count", *CANDIDATE_COLUMNS,
]  # fmt: skip
OPTIONAL_COLUMNS = ["role"]  # read when the run has them
# A cell: its keys plus the label and role derived from them (one role per cell).
CELL_GROUP = [*CELL_KEYS, "probe_label", "role"]


# --------------------------------------------------------------------------- loading


def load_rows(run_dirs: list[str | Path], single_judge: bool = True) -> pd.DataFrame:
    """Every row of the runs without images, plus `run` and `probe_label` columns. With
    `single_judge`, rows scored by different judge models are refused."""
    frames = []
    for run_dir in run_dirs:
        require_run_folder(run_dir)
        available = row_columns(run_dir)
        columns = STAT_COLUMNS + [c for c in OPTIONAL_COLUMNS if c in available]
        frame = read_rows(run_dir, columns=columns).to_pandas()
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


def cell_stats(frame: pd.DataFrame) -> pd.DataFrame:
    """One line per cell, keys first, in a stable order."""
    keys = CELL_GROUP
    records = [
        {**dict(zip(keys, key, strict=False)), **group_stats(group)}
        for key, group in frame.groupby(keys, sort=True, dropna=False)
    ]
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
    return ([BASE_METHOD] if BASE_METHOD in methods else []) + [m for m in methods if m != BASE_METHOD]


def probe_order(labels) -> list[str]:
    """The baseline probe (the plain prompt) first, then the others by name; a probe's parameter
    variants in numeric order (eta=2 before eta=10, v=1.0 before v=1.04), not as text."""
    labels = sorted(set(labels), key=natural_key)
    baselines = baseline_probes(probe_of_label(label) for label in labels)
    first = [label for label in labels if probe_of_label(label) in baselines]
    return first + [label for label in labels if label not in first]


def probe_of_label(label: str) -> str:
    """The probe name a probe label starts with (`noise_based[eta=1.5]` -> `noise_based`)."""
    return label.split("[", 1)[0]


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
    paper: pd.DataFrame  # what paper_table.csv holds
    # The report's worst case over probes (engine.report.worst_case); None = the probes' class facts decide.
    worst_case_probes: list[str] | None = None
    # Paths inside `output`; for a report uploaded to an object store, the files' URIs.
    plots: list[tuple[str, Path | str]] = field(default_factory=list)
    sheets: list[tuple[dict[str, Any], Path | str]] = field(default_factory=list)
    paired_sheets: list[tuple[str, Path | str]] = field(default_factory=list)
    # Per cell position: score columns whose best-of-N pick was made by the model that judges them.
    inflated: dict[int, set[str]] = field(default_factory=dict)


def cell_slug(cell: dict[str, Any]) -> str:
    """A file name per cell: readable keys plus a hash of all of them (params included), so unique."""
    text = "__".join(str(cell[k]) for k in ("model", "concept", "target_concept", "probe_label"))
    digest = hashlib.sha256("\x1f".join(str(cell[k]) for k in CELL_KEYS).encode()).hexdigest()[:8]
    return f"{re.sub(r'[^A-Za-z0-9._-]+', '-', text)[:100]}__{digest}"


def method_label(method: str) -> str:
    return "base model" if method == BASE_METHOD else method
