"""Log a finished `engine run` to each tracker of its spec: the report is built once, then each
tracker logs the same record (engine.tracking.run_record)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from engine.errors import UserError
from engine.tracking.run_record import run_record

# tracker -> (the name a person knows it by, where to look when logging fails)
_HINTS = {"mlflow": ("MLflow", "check MLFLOW_TRACKING_URI"),
          "wandb": ("W&B", "check WANDB_MODE, WANDB_DIR and, online, WANDB_API_KEY")}


def log_finished_run(output: str | Path, config: dict[str, Any], trackers: Sequence[str]) -> Iterator[str]:
    """One line per tracker as it is logged. A tracker that fails stops here with one line: the rows
    are complete either way, and rerunning the same command logs again without generating anything."""
    from engine.tracking import mlflow_run, wandb_run

    loggers = {"mlflow": mlflow_run.log_run, "wandb": wandb_run.log_run}
    with run_record(output, config) as record:
        for tracker in trackers:
            try:
                yield loggers[tracker](record)
            except Exception as error:  # noqa: BLE001 (the store refused or is unreachable: the rows are done)
                name, hint = _HINTS[tracker]
                first = str(error).splitlines()[0] if str(error) else ""
                raise UserError(f"the run is complete, but logging it to {name} failed "
                                f"({type(error).__name__}: {first}); {hint}") from None
