"""The Ray Data datasink of a run: result rows -> OUTPUT/rows/<name>.parquet, never half a file.

Each write task makes one Parquet file of its blocks, in memory, and publishes it whole:
- on a file system: written as a hidden `.tmp-...` file, then renamed to its final name, so a
  final-named file is always complete (a killed task leaves only a temporary, which readers skip
  and the next run removes under the lock);
- on an object store: one PUT, which makes the object appear whole or not at all.
Before publishing, the task checks the output's lock still carries its run's token (fencing).

Each file records where it was written (Ray node id, host, pid) in its Parquet metadata under
`engine.writer`, so tests and users can see which node wrote what. With `driver_only` (a local
output on a multi-node cluster) Ray runs every write task on the driver's node.

Fault hook, for tests only: with ENGINE_FAULT_INJECT=kill-writer in the driver's environment (it is
passed on to Ray's workers), every write task kills its own worker process with SIGKILL before
writing, so Ray's task retries run out (tests/pipeline/test_fault_classes.py: a worker lost).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import uuid
from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from ray.data import Datasink
from ray.data.block import Block, BlockAccessor

from engine.lock import holds_lock, lock_holder
from engine.results import ROWS_DIR, Output, table_bytes
from engine.storage import OutputLocation, output_location, temporary_name

WRITER_KEY = b"engine.writer"
FAULT_ENV = "ENGINE_FAULT_INJECT"


class LockLost(RuntimeError):
    """The output's lock now belongs to another run: this run must not add files."""


def writer_info(output: Output, name: str) -> dict[str, Any]:
    """The `engine.writer` metadata of a published results file: node id, host, pid, rows."""
    with output_location(output).open_input(ROWS_DIR, name) as handle:
        metadata = pq.read_schema(handle).metadata or {}
    return json.loads(metadata[WRITER_KEY]) if WRITER_KEY in metadata else {}


def publish_rows(output: OutputLocation, table: pa.Table, lock_token: str | None, node_id: str | None) -> dict:
    """Write `table` as one new results file, whole or not at all. Returns what was written where."""
    name = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:12]}.parquet"
    writer = {"node_id": node_id, "host": socket.gethostname(), "pid": os.getpid(), "rows": table.num_rows}
    metadata = {**(table.schema.metadata or {}), WRITER_KEY: json.dumps(writer).encode()}
    data = table_bytes(table.replace_schema_metadata(metadata))
    if output.renames_atomically:
        temporary = temporary_name(name)
        output.write_bytes(data, ROWS_DIR, temporary)
        try:
            _check_fence(output, lock_token)
            output.rename((ROWS_DIR, temporary), (ROWS_DIR, name))
        except BaseException:
            output.delete(ROWS_DIR, temporary)
            raise
    else:
        _check_fence(output, lock_token)
        output.write_bytes(data, ROWS_DIR, name)
    return {"file": name, **writer}


def _check_fence(output: OutputLocation, lock_token: str | None) -> None:
    if lock_token is not None and not holds_lock(output, lock_token):
        raise LockLost(f"{output}: this run no longer holds the output's lock (now: {lock_holder(output)}); "
                       "not publishing its rows")


def ready_writer() -> None:
    """Run as a Ray task before generation: the worker process that will take the write tasks
    starts and imports this module (pyarrow.parquet, the storage backends) while the probe actors
    load their models. Otherwise it starts when the first unit is done, and on a small machine its
    start-up takes CPU from the second unit's generation. Nothing to do once it runs."""


class RowsDatasink(Datasink[list[dict]]):
    """One Parquet file per write task, published atomically into OUTPUT/rows."""

    def __init__(self, output: OutputLocation, lock_token: str | None, driver_only: bool):
        self.output = output
        self.lock_token = lock_token
        self.driver_only = driver_only
        self.written: list[dict] = []

    @property
    def supports_distributed_writes(self) -> bool:
        return not self.driver_only  # False: Ray pins every write task to the driver's node

    def get_name(self) -> str:
        return "Rows"

    def write(self, blocks: Iterable[Block], ctx) -> list[dict]:
        import ray

        if os.environ.get(FAULT_ENV) == "kill-writer":
            os.kill(os.getpid(), signal.SIGKILL)

        tables = [BlockAccessor.for_block(block).to_arrow() for block in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return []
        table = pa.concat_tables(tables, promote_options="default")
        node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        return [publish_rows(self.output, table, self.lock_token, node_id)]

    def on_write_complete(self, write_result) -> None:
        self.written = [entry for returned in write_result.write_returns for entry in returned or []]
