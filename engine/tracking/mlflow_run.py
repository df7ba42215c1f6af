"""`engine run --track mlflow` (or `tracking: [mlflow]` in a run file): one MLflow run per engine run.

It logs the resolved config (flattened as params, whole as config.json), the manifest's counts as
metrics, the recovery table's values (rates and means with their 95% interval bounds; for runs
without erased concepts each cell's values) as metrics, and the report folder as artifacts. Where:
MLflow's own default tracking URI (a SQLite file `mlflow.db` in the working folder) unless
MLFLOW_TRACKING_URI says otherwise; the experiment is MLFLOW_EXPERIMENT_NAME or
`erasure-probe-engine`. The run is named after the output folder.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from engine.metrics.columns import METRICS
from engine.results import read_manifest
from engine.storage import output_location

EXPERIMENT = "erasure-probe-engine"
PARAM_LIMIT = 6000  # MLflow's longest param value
_NOT_IN_KEYS = re.compile(r"[^A-Za-z0-9_\-. :/]")  # what MLflow refuses in a metric or param name


def metric_key(*parts: Any) -> str:
    """An MLflow-safe name: the parts joined by '/', characters MLflow refuses replaced by '_'."""
    return _NOT_IN_KEYS.sub("_", "/".join(str(p) for p in parts))[:250]


def flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as dotted keys; lists and long values as (cut) JSON text."""
    params: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            params.update(flat_params(value, name + "."))
        else:
            text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
            params[metric_key(name)] = text[:PARAM_LIMIT]
    return params


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


def log_run(output: str | Path, config: dict[str, Any]) -> str:
    """Build the run's report and log it with the config, counts and table values; returns the MLflow run id."""
    import mlflow

    from engine.report.build import build_report

    location = output_location(output)
    manifest = read_manifest(location)
    with tempfile.TemporaryDirectory(prefix="engine-track-") as scratch:
        # A local output keeps its report (OUTPUT/report); a remote one's is built here to be logged.
        report_dir = location.local_path() / "report" if location.is_local else Path(scratch) / "report"
        build_report([output], report_dir)
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT)
        name = location.uri.rstrip("/").rsplit("/", 1)[-1]
        with mlflow.start_run(run_name=name) as active:
            mlflow.set_tags({"engine_version": str(manifest.get("engine_version")), "output": location.uri,
                             "git_commit": str(manifest.get("git_commit")), "status": str(manifest.get("status"))})
            params = flat_params(config)
            for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                mlflow.log_params(dict(list(params.items())[start:start + 100]))
            mlflow.log_dict(config, "config.json")
            mlflow.log_metrics({**dict(count_metrics(manifest)), **table_metrics(report_dir)})
            mlflow.log_artifacts(str(report_dir), artifact_path="report")
            return active.info.run_id


def absolute_tracking_uri() -> str:
    """The tracking URI this process would use, with a relative SQLite or file path made absolute,
    so Ray workers in other folders (engine tune's trials) write to the same store."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    match = re.match(r"^sqlite:///(?!/)(.+)$", uri)
    if match:
        return f"sqlite:///{Path(match.group(1)).resolve()}"
    if "://" not in uri:
        return Path(uri).resolve().as_uri()
    return uri
