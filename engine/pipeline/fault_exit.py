"""The error path of `engine run`: a fault mid-run (engine.pipeline.faults) leaves the output in a
state the same command resumes from, and becomes one RunFault with its line, counts and exit code."""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from engine.errors import UserError
from engine.failures import read_failures, write_failures
from engine.lock import OutputLock
from engine.pipeline.faults import (
    DISK_FULL,
    DISK_FULL_ERRNOS,
    ENGINE_BUG,
    MODEL_UNAVAILABLE,
    OBJECT_STORE,
    OUTPUT_UNWRITABLE,
    WORKER_LOST,
    Diagnosis,
    RunFault,
    diagnose,
    first_line,
    probe_output,
    user_error_in,
    write_bug_log,
)
from engine.pipeline.grid import RunGrid
from engine.results import ROWS_DIR, finished_row_ids, now_iso, read_manifest, remove_temporaries, write_manifest
from engine.storage import OutputLocation

logger = logging.getLogger(__name__)


@contextmanager
def stopping_cleanly(grid: RunGrid, output: OutputLocation, lock: OutputLock) -> Iterator[None]:
    """Turn any fault of the body into a RunFault, after settling the output (under the lock).
    A UserError (bad input found late), Ctrl-C and SIGTERM pass through unchanged."""
    started = time.perf_counter()
    try:
        yield
    except (UserError, KeyboardInterrupt, SystemExit):
        raise
    except Exception as error:
        message = user_error_in(error)
        if message is not None:  # bad input a worker found: one line and exit 2, like the driver's
            raise UserError(message) from error
        raise settle(error, grid, output, lock, time.perf_counter() - started) from error


def settle(error: Exception, grid: RunGrid, output: OutputLocation, lock: OutputLock, seconds: float) -> RunFault:
    """Leave the output resumable after `error` and describe it (see engine.pipeline.faults)."""
    if output.is_local:  # first: on a full disk, removing them frees the room the probe needs
        _quietly("remove the temporaries", lambda: remove_temporaries(output))
    probe = probe_output(output)
    # Remote storage whose listing (the probe) fails fails every other call too, each only after
    # the client's retries: trying them would delay the error line by half a minute, to no use.
    readable = output.is_local or probe is None
    if not output.is_local and readable:
        _quietly("remove the temporaries", lambda: remove_temporaries(output))
    models = [*grid.models, *([grid.base] if grid.base else [])]
    # Local folders and files as absolute paths (a hub id or built-in name is no path).
    sources = [str(Path(source).expanduser().resolve()) for m in models for source in (m.pretrained, m.unet)
               if source and source.startswith(("/", ".", "~"))]
    diagnosis = diagnose(error, output, probe, model_sources=sources)
    trace = "".join(traceback.format_exception(error))
    saved = _quietly("count the rows saved", lambda: finished_row_ids(output)) if readable else None
    planned = len(grid.rows)
    already_done = _already_done(output, saved) if readable else 0
    if probe is None:
        done = saved or set()
        _quietly("update failures.parquet",
                 lambda: write_failures(output, [f for f in read_failures(output) if f.row.row_id not in done]))
        _quietly("record the fault in the manifest",
                 lambda: _record_fault(output, diagnosis, planned, already_done, saved))
    elif probe not in DISK_FULL_ERRNOS:  # a full disk still lets the lock be deleted
        # The lock cannot be removed either: it stays, held by this (soon dead) process, and the
        # next run takes it over (engine.lock: a holder whose process is gone is stale).
        lock.abandon()
    log_path = write_bug_log(output, trace) if diagnosis.fault is ENGINE_BUG and probe is None else None
    if saved is None:
        counts = f"rows saved in {output}: unknown (it cannot be read now); {planned} planned"
        saved_note = "rows saved: unknown"
    else:
        counts = (f"{max(len(saved) - already_done, 0)} rows generated, {already_done} already done, "
                  f"{len(saved)} of {planned} in {output} ({seconds:.1f} s)")
        saved_note = f"{len(saved):,} of {planned:,} rows saved"
    return RunFault(diagnosis.fault, _line(diagnosis, grid, output, trace, saved_note, log_path), counts, trace)


def _line(diagnosis: Diagnosis, grid: RunGrid, output: OutputLocation, trace: str, saved_note: str,
          log_path: str | None) -> str:
    fault = diagnosis.fault
    advice = fault.advice
    if fault in (DISK_FULL, OUTPUT_UNWRITABLE, OBJECT_STORE):
        writing_rows = any(marker in trace for marker in ("publish_rows", "RowsDatasink", "ray::Write"))
        where = f"writing {output.display(ROWS_DIR) if writing_rows else output}"
        head = f"{diagnosis.what} {where}"
    elif fault is MODEL_UNAVAILABLE:
        head = f"{diagnosis.what}: {_model_named(grid, trace)} ({first_line(diagnosis.root)})"
    elif fault is WORKER_LOST:
        head = f"{diagnosis.what} ({first_line(diagnosis.root)})"
    else:
        where = f"traceback in {log_path}" if log_path else "the output cannot take its log: run again with -v"
        head = f"engine bug: {first_line(diagnosis.root)}; {where}"
    return f"{head} ({saved_note}; {advice})"


def _model_named(grid: RunGrid, trace: str) -> str:
    """The run's model whose source the traceback mentions (the longest match), else 'a model'."""
    models = [*grid.models, *([grid.base] if grid.base else [])]
    named = sorted(((len(source), m.name, source) for m in models for source in (m.pretrained, m.unet)
                    if source and source in trace), reverse=True)
    if not named:
        return "a model of the run"
    _, name, source = named[0]
    return f"model {name}" + (f" ({source})" if source != name else "")


def _already_done(output: OutputLocation, saved: set[str] | None) -> int:
    """Rows done before this run: the count its manifest recorded at the start. A fault before that
    manifest was written (its status is not `running`) came before any row of this run."""
    manifest = _quietly("read the manifest", lambda: read_manifest(output)) or {}
    if manifest.get("status") == "running" and isinstance(manifest.get("counts", {}).get("already_done"), int):
        return manifest["counts"]["already_done"]
    return len(saved or ())


def _record_fault(output: OutputLocation, diagnosis: Diagnosis, planned: int, already_done: int,
                  saved: set[str] | None) -> None:
    manifest = read_manifest(output)
    counts = {**manifest.get("counts", {}), "planned": planned, "already_done": already_done}
    if saved is not None:
        counts.update(generated=max(len(saved) - already_done, 0), rows_in_dataset=len(saved))
    failed_at = now_iso()
    manifest.update(status=f"failed: {diagnosis.fault.key}", failed_at=failed_at, counts=counts,
                    fault={"class": diagnosis.fault.key, "exit_code": diagnosis.fault.exit_code,
                           "error": first_line(diagnosis.root)})
    manifest.setdefault("history", []).append({"failed_at": failed_at, "status": manifest["status"],
                                               "generated": counts.get("generated")})
    write_manifest(output, manifest)


def _quietly(what: str, action):
    """Best effort on an output that may be failing: a second error must not hide the first."""
    try:
        return action()
    except Exception:
        logger.info("after the fault, could not %s", what, exc_info=True)
        return None

