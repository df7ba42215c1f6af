"""Progress a user can watch: done / total, rate and ETA. A live bar when stderr is a terminal, a
plain line every ENGINE_PROGRESS_SECONDS (default 30) otherwise (CI, nohup, cluster jobs), so a
log shows the run is alive without filling up."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import TextIO

from engine.errors import UserError

logger = logging.getLogger(__name__)

PROGRESS_SECONDS_ENV = "ENGINE_PROGRESS_SECONDS"
DEFAULT_PROGRESS_SECONDS = 30.0


def progress_seconds() -> float:
    """Seconds between progress lines when stderr is not a terminal."""
    raw = os.environ.get(PROGRESS_SECONDS_ENV)
    if raw is None:
        return DEFAULT_PROGRESS_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise UserError(f"{PROGRESS_SECONDS_ENV} must be a positive number of seconds, got {raw!r}")
    return value


def eta_text(seconds: float | None) -> str:
    return "?" if seconds is None else str(timedelta(seconds=round(seconds)))


class Progress:
    """done / total of something (rows, trials). `update` takes the absolute count done so far."""

    def __init__(
        self,
        total: int,
        what: str,
        label: str,
        rate_unit: str,
        live: bool,
        stream: TextIO | None = None,
        interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.total, self.what, self.label, self.rate_unit = total, what, label, rate_unit
        self.stream = stream
        self.interval = progress_seconds() if interval is None else interval
        self.clock = clock
        self.started = self.last_line = clock()
        self.done = 0
        self.note = ""
        self.lines = 0
        self.bar = None
        if live:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit=rate_unit.split("/")[0], desc=label, file=self._stream(),
                            dynamic_ncols=True, leave=True)

    def _stream(self) -> TextIO:
        return self.stream or sys.stderr  # looked up late: a CLI test runner swaps sys.stderr

    def rate(self) -> float | None:
        elapsed = self.clock() - self.started
        return self.done / elapsed if self.done and elapsed > 0 else None

    def line(self) -> str:
        rate = self.rate()
        eta = (self.total - self.done) / rate if rate else None
        percent = 100.0 * self.done / self.total if self.total else 100.0
        rate_text = f"{rate:.2f} {self.rate_unit}" if rate else f"? {self.rate_unit}"
        note = f", {self.note}" if self.note else ""
        return (f"{self.label}: {self.done}/{self.total} {self.what} ({percent:.0f}%), {rate_text}, "
                f"ETA {eta_text(eta)}{note}")

    def update(self, done: int, note: str = "") -> None:
        step, self.done, self.note = done - self.done, done, note
        if self.bar is not None:
            if note:
                self.bar.set_postfix_str(note, refresh=False)
            self.bar.update(step)
            return
        if self.clock() - self.last_line >= self.interval:
            self._print()

    def _print(self) -> None:
        self.last_line = self.clock()
        self.lines += 1
        print(self.line(), file=self._stream(), flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.lines:  # a log that showed progress also shows where it ended
            self._print()


@contextmanager
def watched(progress: Progress, fetch: Callable[[], tuple[int, str]], poll_seconds: float = 1.0) -> Iterator[None]:
    """Poll `fetch` -> (done, note) in a background thread while the body runs, then close."""
    stop = threading.Event()

    def poll() -> None:
        try:
            progress.update(*fetch())
        except Exception as error:  # noqa: BLE001 - progress must never break the run it shows
            logger.debug("progress poll failed: %s", error)

    def loop() -> None:
        while not stop.wait(min(poll_seconds, progress.interval)):
            poll()

    thread = threading.Thread(target=loop, name="engine-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        poll()
        progress.close()
