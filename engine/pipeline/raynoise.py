"""Filters for Ray's own messages that tell an engine user nothing.

- "Progress bars disabled ...": Ray Data's logger, when its bars are off; the engine shows its own.
- "Actor with class name: 'MapWorker(...)' ... has constructor arguments in the object store and
  max_restarts > 0 ...": logged by Ray's C++ core worker once per actor pool of every Ray Data run
  (its constructor arguments are always object refs; ray-project/ray#57733). It is written straight
  to file descriptor 2, past Python's logging, so `filtered_stderr` filters that descriptor.
- "SIGTERM handler is not set because current thread is not the main thread": ray.init in the
  engine's background start thread; the engine sets the same handler itself (ray_start).
- Ray Data's error dump when a stream fails, and the raylet's "a worker died ... will be retried"
  (without -v): the engine prints one line instead when it matters.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

RAY_NOISE = (
    "Progress bars disabled. To enable, set",
    "has constructor arguments in the object store and max_restarts > 0",
    "SIGTERM handler is not set because current thread is not the main thread",
)
# Where Ray logs the Python ones (the logger of the module that writes them).
RAY_NOISY_LOGGERS = ("ray.data._internal.progress", "ray._private.worker")


# The raylet's account of a worker that died under a task, which Ray prints on the driver's stdout
# ("(raylet) A worker died or was killed ...", "Task _map_task failed. There are 2 retries remaining").
# Without -v it is dropped: a retried task costs nothing the user must act on (the manifest counts
# the retries), and when the retries run out the engine's own error line says so.
RAY_RETRY_NOISE = (
    "A worker died or was killed while executing a task",
    "retries remaining, so the task will be retried",
    "The worker died unexpectedly while executing this task",
)


def is_noise(text: str) -> bool:
    return any(marker in text for marker in RAY_NOISE)


def is_retry_noise(text: str) -> bool:
    return any(marker in text for marker in RAY_RETRY_NOISE)


class _RetryNoiseFilter(io.TextIOBase):
    """sys.stdout less the raylet's worker-died lines (Ray prints them there with print(), which
    writes the text and its newline separately: whole lines are buffered before deciding)."""

    def __init__(self, target: TextIO):
        self.target = target
        self.pending = ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        kept = "".join(line + "\n" for line in lines if not is_retry_noise(line))
        if kept:
            self.target.write(kept)
        return len(text)

    def flush(self) -> None:
        self.target.flush()

    def close_filter(self) -> None:
        if self.pending and not is_retry_noise(self.pending):
            self.target.write(self.pending)
        self.pending = ""
        self.target.flush()

    def isatty(self) -> bool:
        return self.target.isatty()

    def fileno(self) -> int:
        return self.target.fileno()


@contextmanager
def quiet_retry_lines() -> Iterator[None]:
    """Without -v, while the body runs (a whole run: Ray prints them until it shuts down), sys.stdout
    drops the raylet's "a worker died ... will be retried" lines."""
    if logging.getLogger().isEnabledFor(logging.INFO):
        yield
        return
    stdout = sys.stdout
    quiet = _RetryNoiseFilter(stdout)
    sys.stdout = quiet
    try:
        yield
    finally:
        sys.stdout = stdout
        quiet.close_filter()


class RayNoiseFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not is_noise(record.getMessage())


class RayDataErrorFilter(logging.Filter):
    """Ray Data's own account of a failed stream: tracebacks and "please open an issue on the Ray
    project" (hundreds of lines). The engine says what failed in one line (engine.pipeline.faults);
    Ray Data's log file keeps the whole account, and -v shows it on the terminal too."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR


def filter_ray_loggers() -> None:
    for name in RAY_NOISY_LOGGERS:
        target = logging.getLogger(name)
        if not any(isinstance(f, RayNoiseFilter) for f in target.filters):
            target.addFilter(RayNoiseFilter())
    if not logging.getLogger().isEnabledFor(logging.INFO):  # without -v
        # Ray Data logs through its own handlers (console and file, not propagated): quiet the console's.
        for handler in logging.getLogger("ray.data").handlers:
            is_console = isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
            if is_console and not any(isinstance(f, RayDataErrorFilter) for f in handler.filters):
                handler.addFilter(RayDataErrorFilter())


@contextmanager
def filtered_stderr() -> Iterator[TextIO]:
    """While the body runs, file descriptor 2 goes through a pipe; a thread passes every line on
    to the real stderr except Ray's noise (and, without -v, the raylet's retry lines). Yields a
    stream onto the real stderr, for a live progress bar (it measures the terminal's width, which a
    pipe has not)."""
    sys.stderr.flush()
    try:
        real = os.dup(2)
    except OSError:  # no stderr at all (a daemon): nothing to filter
        yield sys.stderr
        return
    quiet = not logging.getLogger().isEnabledFor(logging.INFO)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def forward() -> None:
        # Pieces go on as soon as they arrive (a live progress bar redraws with \r, not \n); each
        # of Ray's noise lines is written whole by one call, so it arrives in one piece.
        try:
            while chunk := os.read(read_end, 65536):
                for piece in chunk.splitlines(keepends=True):
                    text = piece.decode("utf-8", "replace")
                    if not is_noise(text) and not (quiet and is_retry_noise(text)):
                        os.write(real, piece)
        except OSError:  # the descriptors closed under us at the very end: nothing left to pass on
            pass

    thread = threading.Thread(target=forward, name="engine-stderr-filter", daemon=True)
    thread.start()
    terminal = os.fdopen(os.dup(real), "w", buffering=1)
    try:
        yield terminal
    finally:
        terminal.close()
        sys.stderr.flush()
        os.dup2(real, 2)  # closes the pipe's last write end: the thread sees EOF and ends
        thread.join(timeout=5)
        os.close(read_end)
        os.close(real)
