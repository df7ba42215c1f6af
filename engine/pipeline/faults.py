"""Faults that stop a run midway, at the driver: the root cause is found among Ray's wrapped
exceptions, named in one `error:` line with the place and the rows saved, and given its exit code.

A fault is not the user's input (that is a UserError, exit 2) and not one row's failure (those go to
failures.parquet, exit 3): the stream itself stopped. The classes, their exit codes and what to do
are the README's "Exit codes" table; `FAULT_CLASSES` is its source. Only an engine bug gets a
traceback, written to OUTPUT/logs/<time>.log (or shown with -v).

What each class leaves behind (engine.pipeline.run calls `settle` under the lock):
- the manifest's `status` reads `failed: <class>` with `failed_at` and the counts, where the output
  can still be written;
- failures.parquet keeps the earlier runs' row failures, less every row that now has a result (rows
  that failed in the stopped run are not listed: the same command runs them again anyway);
- temporaries: removed when the output can be written (on a full disk that frees the space of the
  half-written file), else left for the next start's clean-up, which runs under the lock;
- the lock: released (on a full disk too: deleting needs no space), except where the output cannot
  be written (read-only, gone, object store unreachable):
  it is left, with this process's id, for the next run's takeover (engine.lock: a dead holder).
"""

from __future__ import annotations

import errno
import logging
import re
import time
import traceback
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from engine.storage import OutputLocation

logger = logging.getLogger(__name__)

LOGS_DIR = "logs"


@dataclass(frozen=True)
class FaultClass:
    key: str  # in the manifest: `failed: <key>`
    exit_code: int
    meaning: str
    advice: str  # the end of the error line: what to do


DISK_FULL = FaultClass("disk-full", 10, "the output's disk is full or its quota is used up",
                       "free space and run the same command to resume")
OUTPUT_UNWRITABLE = FaultClass("output-unwritable", 11, "the output became read-only, lost its permissions or "
                               "was removed", "make it writable again and run the same command to resume")
OBJECT_STORE = FaultClass("object-store", 12, "the object store of the output cannot be reached or refused the "
                          "credentials", "check the endpoint and credentials, then run the same command to resume")
MODEL_UNAVAILABLE = FaultClass("model-unavailable", 13, "a model could not be loaded: the hub is unreachable or "
                               "the model (folder, file, hub id) is gone",
                               "make the model available and run the same command to resume")
WORKER_LOST = FaultClass("worker-lost", 14, "a node, actor or worker process died beyond Ray's retries",
                         "run the same command to resume (if it repeats, check the nodes' memory and Ray's logs)")
ENGINE_BUG = FaultClass("engine-bug", 15, "an error the engine did not expect (a bug): its traceback is in "
                        "OUTPUT/logs/", "please report it with that log; the same command resumes")
FAULT_CLASSES = (DISK_FULL, OUTPUT_UNWRITABLE, OBJECT_STORE, MODEL_UNAVAILABLE, WORKER_LOST, ENGINE_BUG)

DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
UNWRITABLE_ERRNOS = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT, errno.ENOTDIR, errno.ESTALE}
# Text of errors whose type says nothing (pyarrow raises a plain OSError for every S3 problem).
DISK_FULL_TEXT = ("no space left on device", "disk quota exceeded")
STORE_TEXT = ("aws error", "curlcode", "couldn't connect to server", "could not connect to the endpoint",
              "access_denied", "accessdenied", "invalidaccesskeyid", "signaturedoesnotmatch", "nosuchbucket",
              "connection refused", "unable to locate credentials", "network_connection")
MODEL_TEXT = ("huggingface.co", "does not appear to have a file named", "no file named",
              "is not a local folder and is not a valid model identifier", "hf_hub_offline", "local hugging face cache",
              "neither a valid local path nor a valid repo id",
              "repository not found", "we couldn't connect to")
# Ray's exceptions for a process, actor, node or object that is gone (by name: imported lazily).
LOST_TYPES = {"RayActorError", "ActorDiedError", "ActorUnavailableError", "WorkerCrashedError", "NodeDiedError",
              "LocalRayletDiedError", "ObjectLostError", "OwnerDiedError", "ObjectReconstructionFailedError",
              "ObjectReconstructionFailedMaxAttemptsExceededError", "ObjectReconstructionFailedLineageEvictedError",
              "ReferenceCountingAssertionError", "ObjectFetchTimedOutError", "OutOfMemoryError", "RaySystemError",
              "OutOfDiskError"}


@dataclass(frozen=True)
class Diagnosis:
    fault: FaultClass
    root: BaseException  # the exception that names the cause (a wrapped one unwrapped)
    what: str  # "no space left on device", "the output is read-only", ...


class RunFault(Exception):
    """A run stopped by a fault: `line` is the one error line (without `error: `), `counts` the counts
    line, `trace` the full traceback (shown with -v)."""

    def __init__(self, fault: FaultClass, line: str, counts: str, trace: str):
        super().__init__(line)
        self.fault = fault
        self.line = line
        self.counts = counts
        self.trace = trace

    @property
    def exit_code(self) -> int:
        return self.fault.exit_code


def exception_chain(error: BaseException) -> Iterator[BaseException]:
    """The error and every exception behind it: Ray's `cause` (RayTaskError and kin), `__cause__`
    and `__context__`, breadth first, each once."""
    seen: set[int] = set()
    queue = [error]
    while queue:
        current = queue.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        for behind in (getattr(current, "cause", None), current.__cause__, current.__context__):
            if isinstance(behind, BaseException):
                queue.append(behind)


_USER_ERROR_LINE = re.compile(r"^(?:engine\.errors\.)?UserError: (.+)$", re.MULTILINE)


def user_error_in(error: BaseException) -> str | None:
    """The message of a UserError raised in a worker (bad input found there, e.g. an attention kernel
    the device lacks), which reaches the driver wrapped by Ray (as an object or only as text)."""
    from engine.errors import UserError

    for current in exception_chain(error):
        if isinstance(current, UserError) and not hasattr(current, "cause"):
            return str(current)
    found = _USER_ERROR_LINE.search("\n".join(str(e) for e in exception_chain(error)))
    return found.group(1).strip() if found else None


def _errno(error: BaseException) -> int | None:
    code = getattr(error, "errno", None)
    if isinstance(code, int):
        return code
    # pyarrow: "[Errno 28] Error writing bytes to file. Detail: [errno 28] No space left on device"
    text = str(error).lower()
    for number in DISK_FULL_ERRNOS | UNWRITABLE_ERRNOS:
        if f"[errno {number}]" in text:
            return number
    return None


def _type_names(error: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(error).__mro__}


def _module_of(error: BaseException) -> str:
    return type(error).__module__ or ""


def diagnose(
    error: BaseException, output: OutputLocation, output_probe: int | None = None, model_sources: Iterable[str] = ()
) -> Diagnosis:
    """The fault class of a stream that raised `error`. `output_probe`: the errno of a test write
    into the output made after the fault (None: it worked), the plainest evidence of a full disk or
    an output gone read-only whatever the wrapped error says. `model_sources`: the run's local model
    paths; a file missing under one of them is a model gone. Ray passes a remote error on as text
    (its traceback) more often than as an object, so the text is read too."""
    chain = list(exception_chain(error))
    texts = [str(e).lower() for e in chain]
    text = "\n".join(texts) + "\n" + "".join(traceback.format_exception(error)).lower()

    # Ray's wrappers (RayTaskError(X) holds X as `cause`) repeat their cause's text: look at them last,
    # so the error named is the one raised, not its wrapper.
    unwrapped_first = sorted(chain, key=lambda e: isinstance(getattr(e, "cause", None), BaseException))

    def first(predicate) -> BaseException | None:
        return next((e for e in unwrapped_first if predicate(e)), None)

    full = first(lambda e: _errno(e) in DISK_FULL_ERRNOS or any(t in str(e).lower() for t in DISK_FULL_TEXT))
    if full is not None or output_probe in DISK_FULL_ERRNOS:
        return Diagnosis(DISK_FULL, full or error, "no space left on device")
    hub = first(lambda e: _module_of(e).startswith("huggingface_hub"))
    missing_file = "no such file or directory" in text or "filenotfounderror" in text
    model_file_gone = missing_file and any(source in text for source in _local_sources(model_sources))
    if hub is not None or model_file_gone or any(t in text for t in MODEL_TEXT):
        root = hub or first(lambda e: any(t in str(e).lower() for t in MODEL_TEXT)) or error
        return Diagnosis(MODEL_UNAVAILABLE, root, "a model could not be loaded")
    if not output.is_local:
        store = first(lambda e: _module_of(e).startswith(("botocore", "s3fs", "gcsfs", "adlfs", "aiohttp"))
                      or isinstance(e, ConnectionError) or any(t in str(e).lower() for t in STORE_TEXT))
        if store is not None or output_probe is not None:
            return Diagnosis(OBJECT_STORE, store or error, "the object store cannot be reached")
    lock_lost = first(lambda e: "LockLost" in _type_names(e))
    if lock_lost is not None:
        return Diagnosis(OUTPUT_UNWRITABLE, lock_lost, "another run took over the output's lock")
    if output_probe in UNWRITABLE_ERRNOS:
        return Diagnosis(OUTPUT_UNWRITABLE, first(lambda e: _errno(e) == output_probe) or error,
                         _UNWRITABLE_WHAT.get(output_probe, "the output cannot be written"))
    lost = first(lambda e: bool(_type_names(e) & LOST_TYPES))
    if lost is not None:
        return Diagnosis(WORKER_LOST, lost, _lost_what(lost))
    return Diagnosis(ENGINE_BUG, _deepest(error), "an unexpected error")


_UNWRITABLE_WHAT = {
    errno.EROFS: "the output is read-only",
    errno.EACCES: "permission denied on the output",
    errno.EPERM: "permission denied on the output",
    errno.ENOENT: "the output folder is gone",
    errno.ENOTDIR: "the output folder is gone",
    errno.ESTALE: "the output's network mount went stale",
}


def _local_sources(sources: Iterable[str]) -> list[str]:
    """The model sources that are absolute local paths, lower-cased like the text searched."""
    return [source.lower() for source in sources if source and Path(source).is_absolute()]


def _lost_what(error: BaseException) -> str:
    names = _type_names(error)
    if "NodeDiedError" in names or "LocalRayletDiedError" in names:
        return "a Ray node died"
    if "OutOfMemoryError" in names:
        return "Ray killed a worker for lack of memory"
    if names & {"RayActorError", "ActorDiedError", "ActorUnavailableError"}:
        return "an actor died beyond its restarts"
    if "ObjectLostError" in names:
        return "results held by a lost worker are gone"
    return "a worker process died beyond its retries"


def _deepest(error: BaseException) -> BaseException:
    """The innermost cause (Ray's `cause`, then `raise ... from`), not what was being handled when
    it happened (`__context__`: Ray Data's own StopIteration and the like); never Ray Data's bare
    SystemException marker."""
    deepest, seen = error, {id(error)}
    while True:
        behind = getattr(deepest, "cause", None)
        if not isinstance(behind, BaseException):
            behind = deepest.__cause__
        if behind is None or id(behind) in seen or type(behind).__name__ == "SystemException":
            return deepest
        seen.add(id(behind))
        deepest = behind


def probe_output(output: OutputLocation) -> int | None:
    """Write and delete a small file in the output: None if that works, else the errno of the failure
    (an unknown errno reads as EIO). Local outputs only; an object store's probe is a listing."""
    name = f".probe-{time.time_ns()}"
    try:
        if output.is_local:
            path = output.local_path() / name
            path.write_bytes(b"x")
            path.unlink()
        else:
            output.list_files()
        return None
    except OSError as error:
        return error.errno if isinstance(error.errno, int) else errno.EIO
    except Exception:  # noqa: BLE001 (an object store's client raises its own types: unreachable all the same)
        return errno.EIO


def first_line(error: BaseException) -> str:
    """The error's own message, on one line, without Ray's `ray::Write() (pid=...)` header."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(("ray::", "\x1b[36mray::"))] or lines or [repr(error)]
    return f"{type(error).__name__}: {lines[0]}"[:300]


def write_bug_log(output: OutputLocation, trace: str) -> str | None:
    """OUTPUT/logs/<time>.log with the traceback; its path, or None if the output cannot be written."""
    name = f"{time.strftime('%Y%m%dT%H%M%S')}.log"
    try:
        output.makedirs(LOGS_DIR)
        output.write_bytes(trace.encode(), LOGS_DIR, name)
        return output.display(LOGS_DIR, name)
    except Exception:
        logger.info("could not write the traceback into %s", output.display(LOGS_DIR), exc_info=True)
        return None
