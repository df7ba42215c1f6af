"""Log a finished `engine run` to each tracker of its spec: the report is built once, then each
tracker logs the same record (engine.tracking.run_record)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from engine.errors import UserError
from engine.tracking.run_record import run_record
from engine.tracking.trackers import TRACKERS


def log_finished_run(output: str | Path, config: dict[str, Any], trackers: Sequence[str]) -> Iterator[str]:
    """One line per tracker as it is logged. A tracker that fails stops here with one line: the rows
    are complete either way, and rerunning the same command logs again without generating anything."""
    with run_record(output, config) as record:
        for name in trackers:
            tracker = TRACKERS[name]
            try:
                yield tracker.log_run()(record)
            except Exception as error:  # noqa: BLE001 (the store refused or is unreachable: the rows are done)
                first = str(error).splitlines()[0] if str(error) else ""
                raise UserError(f"the run is complete, but logging it to {tracker.title} failed "
                                f"({type(error).__name__}: {first}); {tracker.hint}") from None
