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
from engine.report.stats import mean_interval, wilson_interval
from engine.results import read_rows, require_run_folder

logger = logging.getLogger(__name__)

CELL_KEYS = ["model", "method", "concept", "target_concept", "probe", "params"]
STAT_COLUMNS = [
    "row_id", *CELL_KEYS, "prompt", "prompt_index", "seed", "generation_seconds",
    "clip_score", "clip_model", "judge_top1", "judge_top5", "judge_target_prob", "judge_model", "selector",
    "candidate_count", "candidate_clip_mean", "candidate_top1_rate", "candidate_top5_rate",
]  # fmt: skip
BASE_METHOD = "none"  # ModelSpec.method of an un-erased model
# (label, cell column, scale): rows of the paper table. Rates are shown in %.
PAPER_METRICS = [
    ("CLIP", "clip_mean", 1.0),
    ("Top-1 %", "top1_rate", 100.0),
    ("Top-5 %", "top5_rate", 100.0),
]
CANDIDATE_METRICS = [
    ("CLIP, all candidates", "candidate_clip_mean", 1.0),
    ("Top-1 %, all candidates", "candidate_top1_rate", 100.0),
    ("Top-5 %, all candidates", "candidate_top5_rate", 100.0),
]


# --------------------------------------------------------------------------- loading


def load_rows(run_dirs: list[Path], single_judge: bool = True) -> pd.DataFrame:
    """Every row of the runs without images, plus `run` and `probe_label` columns. With
    `single_judge`, rows scored by different judge models are refused."""
    frames = []
    for run_dir in run_dirs:
        require_run_folder(run_dir)
        frame = read_rows(run_dir, columns=STAT_COLUMNS).to_pandas()
        if frame.empty:
            raise UserError(f"{run_dir} holds no readable result rows")
        frame["run"] = str(run_dir)
        frames.append(frame)
    frame = pd.concat(frames, ignore_index=True)
    duplicated = frame["row_id"].duplicated()
    if duplicated.any():
        logger.warning("%d rows appear in more than one run; each is counted once", int(duplicated.sum()))
        frame = frame[~duplicated].reset_index(drop=True)
    for column in ("clip_model", "judge_model") if single_judge else ():
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


def _rate(series: pd.Series) -> dict[str, Any]:
    hits = [bool(v) for v in present_values(series)]
    low, high = wilson_interval(sum(hits), len(hits))
    rate = sum(hits) / len(hits) if hits else None
    return {"n": len(hits), "hits": sum(hits), "rate": rate, "low": low, "high": high}


def _weighted_candidate_mean(group: pd.DataFrame, column: str) -> float | None:
    """Mean over every candidate of the cell: per-row means weighted by their candidate counts."""
    pairs = [
        (float(v), int(c))
        for v, c in zip(group[column].tolist(), group["candidate_count"].tolist())
        if v is not None and not pd.isna(v) and c is not None and not pd.isna(c) and c > 0
    ]
    total = sum(c for _, c in pairs)
    return sum(v * c for v, c in pairs) / total if total else None


def _joined(series: pd.Series) -> str | None:
    return ", ".join(sorted({str(v) for v in present_values(series)})) or None


def group_stats(group: pd.DataFrame) -> dict[str, Any]:
    """All statistics of one group of rows (a cell, or a pooled probe x method group)."""
    clip_mean, clip_low, clip_high = mean_interval([float(v) for v in present_values(group["clip_score"])])
    top1, top5 = _rate(group["judge_top1"]), _rate(group["judge_top5"])
    target = [float(v) for v in present_values(group["judge_target_prob"])]
    counts = [int(c) for c in present_values(group["candidate_count"])]
    return {
        "n": len(group),
        "clip_n": len(present_values(group["clip_score"])),
        "clip_mean": clip_mean,
        "clip_ci_low": clip_low,
        "clip_ci_high": clip_high,
        "judged_n": top1["n"],
        "top1_hits": top1["hits"],
        "top1_rate": top1["rate"],
        "top1_ci_low": top1["low"],
        "top1_ci_high": top1["high"],
        "top5_hits": top5["hits"],
        "top5_rate": top5["rate"],
        "top5_ci_low": top5["low"],
        "top5_ci_high": top5["high"],
        "target_prob_mean": sum(target) / len(target) if target else None,
        "candidate_n": sum(counts) if counts else None,
        "candidate_clip_mean": _weighted_candidate_mean(group, "candidate_clip_mean"),
        "candidate_top1_rate": _weighted_candidate_mean(group, "candidate_top1_rate"),
        "candidate_top5_rate": _weighted_candidate_mean(group, "candidate_top5_rate"),
        "seconds_per_image": float(group["generation_seconds"].mean()),
        "selector": _joined(group["selector"]),
        "clip_model": _joined(group["clip_model"]),
        "judge_model": _joined(group["judge_model"]),
    }


def cell_stats(frame: pd.DataFrame) -> pd.DataFrame:
    """One line per cell, keys first, in a stable order."""
    keys = [*CELL_KEYS, "probe_label"]
    records = [
        {**dict(zip(keys, key)), **group_stats(group)}
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
    """standard_prompt (the baseline) first, then the others alphabetically."""
    labels = sorted(set(labels))
    return [label for label in labels if label.startswith("standard_prompt")] + [
        label for label in labels if not label.startswith("standard_prompt")
    ]


def paper_table(cells: pd.DataFrame) -> pd.DataFrame:
    """Probes x metrics (rows) by methods (columns): the mean over a probe-method's cells, i.e. over
    concepts, of each cell's value. Rates in %. All-candidates rows only for best-of-N probes."""
    methods = method_order(cells["method"])
    rows = []
    for probe in probe_order(cells["probe_label"]):
        probe_cells = cells[cells["probe_label"] == probe]
        has_candidates = probe_cells["candidate_n"].notna().any()
        for label, column, scale in PAPER_METRICS + (CANDIDATE_METRICS if has_candidates else []):
            row: dict[str, Any] = {"probe": probe, "metric": label}
            for method in methods:
                values = [float(v) for v in present_values(probe_cells.loc[probe_cells["method"] == method, column])]
                row[method] = sum(values) / len(values) * scale if values else None
            rows.append(row)
    return pd.DataFrame(rows, columns=["probe", "metric", *methods])


# --------------------------------------------------------------------------- the report


@dataclass
class ReportContent:
    """Everything the renderers need; paths are inside `output`."""

    output: Path
    runs: list[str]
    created_at: str
    rows: int
    judges: list[str]
    cells: pd.DataFrame
    paper: pd.DataFrame
    plots: list[tuple[str, Path]] = field(default_factory=list)
    sheets: list[tuple[dict[str, Any], Path]] = field(default_factory=list)


def cell_slug(cell: dict[str, Any]) -> str:
    """A file name per cell: readable keys plus a hash of all of them (params included), so unique."""
    text = "__".join(str(cell[k]) for k in ("model", "concept", "target_concept", "probe_label"))
    digest = hashlib.sha256("\x1f".join(str(cell[k]) for k in CELL_KEYS).encode()).hexdigest()[:8]
    return f"{re.sub(r'[^A-Za-z0-9._-]+', '-', text)[:100]}__{digest}"


def method_label(method: str) -> str:
    return "base model" if method == BASE_METHOD else method
