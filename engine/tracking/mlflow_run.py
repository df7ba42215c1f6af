"""`engine run --track mlflow` (or `tracking: [mlflow]` in a run file): one MLflow run per engine run.

It logs the run record (engine.tracking.run_record): the resolved config, flattened as params and
whole as config.json; the counts and the recovery table's values (rates and means with their 95%
interval bounds; for runs without erased concepts each cell's values) as metrics; the report folder
as artifacts. Where: MLflow's own default tracking URI (a SQLite file `mlflow.db` in the working
folder) unless MLFLOW_TRACKING_URI says otherwise; the experiment is MLFLOW_EXPERIMENT_NAME or
`erasure-probe-engine`. The run is named after the output folder.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from engine.tracking.run_record import RunRecord, metric_key

EXPERIMENT = "erasure-probe-engine"
PARAM_LIMIT = 6000  # MLflow's longest param value


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


def log_run(record: RunRecord) -> str:
    """Log the run record as one MLflow run; returns the line to print."""
    import mlflow

    mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT)
    with mlflow.start_run(run_name=record.name) as active:
        mlflow.set_tags(record.tags)
        params = flat_params(record.config)
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            mlflow.log_params(dict(list(params.items())[start:start + 100]))
        mlflow.log_dict(record.config, "config.json")
        mlflow.log_metrics(record.metrics)
        mlflow.log_artifacts(str(record.report_dir), artifact_path="report")
        return f"logged to MLflow: run {active.info.run_id}"


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
