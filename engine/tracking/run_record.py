"""What every experiment tracker logs of a finished `engine run`, gathered once: the run's name
(its output folder's), the resolved config, tags from the manifest, the manifest's counts and the
recovery table's values as metrics, and the report folder to attach."""

from __future__ import annotations

import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from engine.metrics.columns import METRICS
from engine.results import read_manifest
from engine.storage import output_location

_NOT_IN_KEYS = re.compile(r"[^A-Za-z0-9_\-. :/]")  # what MLflow refuses in a metric or param name


@dataclass(frozen=True)
class RunRecord:
    name: str  # the output folder's name: the tracker run's name
    config: dict[str, Any]  # the resolved config the run ran with
    tags: dict[str, str]  # engine_version, git_commit, status, output
    metrics: dict[str, float]  # counts/... and recovery/... (or cell/...) values
    report_dir: Path  # the run's report (OUTPUT/report for a local output)


def metric_key(*parts: Any) -> str:
    """A name every tracker takes: the parts joined by '/' (W&B groups its charts by the first part),
    characters MLflow refuses replaced by '_'."""
    return _NOT_IN_KEYS.sub("_", "/".join(str(p) for p in parts))[:250]


def table_metrics(report_dir: Path) -> dict[str, float]:
    """The recovery table's values (recovery.csv) as metrics, else each cell's (summary.parquet)."""
    metrics: dict[str, float] = {}
    recovery = report_dir / "recovery.csv"
    if recovery.exists():
        for _, line in pd.read_csv(recovery).iterrows():
            for column in ("value", "ci_low", "ci_high"):
                if pd.notna(line[column]):
                    metrics[metric_key("recovery", line["method"], line["probe_label"], line["metric_column"],
                                       column)] = float(line[column])
        return metrics
    cells = pd.read_parquet(report_dir / "summary.parquet")
    values = [column for m in METRICS for column in (m.value, m.ci_low, m.ci_high) if column in cells]
    for _, cell in cells.iterrows():
        for column in values:
            if pd.notna(cell[column]):
                metrics[metric_key("cell", cell["model"], cell["concept"], cell["probe_label"], column)] = float(
                    cell[column])
    return metrics


def count_metrics(manifest: dict[str, Any]) -> Iterator[tuple[str, float]]:
    for key, value in (manifest.get("counts") or {}).items():
        if isinstance(value, int | float):
            yield metric_key("counts", key), float(value)


@contextmanager
def run_record(output: str | Path, config: dict[str, Any]) -> Iterator[RunRecord]:
    """Build the run's report and gather what the trackers log; the report folder lives as long as
    the `with` (a local output keeps it as OUTPUT/report, a remote one's is built in a scratch folder)."""
    from engine.report.build import build_report

    location = output_location(output)
    manifest = read_manifest(location)
    with tempfile.TemporaryDirectory(prefix="engine-track-") as scratch:
        report_dir = location.local_path() / "report" if location.is_local else Path(scratch) / "report"
        build_report([output], report_dir)
        yield RunRecord(
            name=location.uri.rstrip("/").rsplit("/", 1)[-1],
            config=config,
            tags={"engine_version": str(manifest.get("engine_version")), "output": location.uri,
                  "git_commit": str(manifest.get("git_commit")), "status": str(manifest.get("status"))},
            metrics={**dict(count_metrics(manifest)), **table_metrics(report_dir)},
            report_dir=report_dir,
        )
