"""Rows that failed on their own: recorded in OUTPUT/failures.parquet instead of stopping the run.

A failed row is never written to rows/*.parquet, so it is not finished and the same command
retries it. failures.parquet always says the truth about the folder: a row listed there has no
result row, and a retry that succeeds removes it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from engine.probe import WorkRow
from engine.results import IDENTITY_FIELDS, PAIRING_FIELDS, Output, table_bytes
from engine.storage import output_location

FAILURES_FILE = "failures.parquet"
FAILURE_SCHEMA = pa.schema(
    IDENTITY_FIELDS
    + PAIRING_FIELDS
    + [
        pa.field("error_type", pa.string(), nullable=False),
        pa.field("message", pa.string(), nullable=False),
        pa.field("failed_at", pa.timestamp("s", tz="UTC"), nullable=False),
    ]
)
MESSAGE_LIMIT = 2000  # a traceback's last line is enough; a whole tensor repr is not


@dataclass(frozen=True)
class RowFailure:
    """One row's failure: the row's identity, what went wrong and when."""

    row: WorkRow
    error_type: str
    message: str
    failed_at: datetime

    @classmethod
    def of(cls, row: WorkRow, error_type: str, message: str) -> RowFailure:
        return cls(row, error_type, message[:MESSAGE_LIMIT], datetime.now(UTC).replace(microsecond=0))

    def to_record(self) -> dict[str, Any]:
        row = {**asdict(self.row), "erased": list(self.row.erased)}
        return {**row, "error_type": self.error_type, "message": self.message, "failed_at": self.failed_at}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> RowFailure:
        identity = {f.name: record[f.name] for f in IDENTITY_FIELDS}
        pairing: dict[str, Any] = {
            "role": record.get("role") or "unpaired", "erased": tuple(record.get("erased") or ())
        }
        return cls(WorkRow(**identity, **pairing), record["error_type"], record["message"], record["failed_at"])


def failures_path(output: Output) -> str:
    """OUTPUT/failures.parquet, as the user would write it (a path or a URI)."""
    return output_location(output).display(FAILURES_FILE)


def read_failures(output: Output) -> list[RowFailure]:
    location = output_location(output)
    if not location.exists(FAILURES_FILE):
        return []
    with location.open_input(FAILURES_FILE) as handle:
        table = pq.read_table(handle, schema=FAILURE_SCHEMA)
    return [RowFailure.from_record(r) for r in table.to_pylist()]


def write_failures(output: Output, failures: list[RowFailure]) -> None:
    """The folder's failures, written atomically; no failures = no file."""
    location = output_location(output)
    if not failures:
        location.delete(FAILURES_FILE)
        return
    records = [f.to_record() for f in sorted(failures, key=lambda f: (f.failed_at, f.row.row_id))]
    location.atomic_write(table_bytes(pa.Table.from_pylist(records, schema=FAILURE_SCHEMA)), FAILURES_FILE)


def merge_failures(
    previous: list[RowFailure], new: list[RowFailure], attempted: set[str], finished: set[str]
) -> list[RowFailure]:
    """What failures.parquet holds after a run: earlier failures of rows this run did not attempt,
    plus this run's failures (one per row: the latest), minus every row that now has a result."""
    latest: dict[str, RowFailure] = {f.row.row_id: f for f in previous if f.row.row_id not in attempted}
    for failure in sorted(new, key=lambda f: f.failed_at):
        latest[failure.row.row_id] = failure
    return [f for row_id, f in latest.items() if row_id not in finished]
