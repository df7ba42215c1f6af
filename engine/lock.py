"""One writer per output folder: OUTPUT/engine.lock names the holder (command, host, pid, start).

Taking the lock:
- local or shared file system: the lock's content is written to a hidden temporary and hard-linked
  to the lock's name, which fails when the lock exists (exclusive and complete in one step, NFS
  included);
- S3: a conditional PUT (If-None-Match: *) through boto3 when it is installed;
- other object stores (or S3 without boto3): write, wait, read back. Two runs started within that
  wait can both believe they hold it; the fencing check below still keeps either from publishing
  a file once the other owns the lock.

A lock whose holder is gone is taken over: on the same host, the holder's pid is not running (or
is a newer process with the same pid); from another host, its heartbeat (refreshed every minute
while the run lives) is older than STALE_AFTER_SECONDS. A live holder makes the new run stop with
a one-line UserError that names it.

Fencing: every results file is published only after checking the lock still holds its writer's
token (`holds_lock`), so a stray write task of a dead run cannot land a file after a new run took
over and planned its rows.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from urllib.parse import urlsplit

from engine.errors import UserError
from engine.storage import OutputLocation, output_location, temporary_name

logger = logging.getLogger(__name__)

LOCK_FILE = "engine.lock"
HEARTBEAT_SECONDS = 60.0
STALE_AFTER_SECONDS = 600.0  # a lock from another host with no heartbeat for this long is taken over
READ_BACK_WAIT_SECONDS = 1.0  # write-then-read-back on object stores without conditional writes
ATTEMPTS = 4


@dataclass(frozen=True)
class LockInfo:
    token: str
    holder: str  # e.g. "engine run"
    host: str
    pid: int
    pid_started: str | None  # the process's start time (Linux), to tell a reused pid from the holder
    started_at: str
    heartbeat_at: float  # unix time (whole seconds) of the latest heartbeat
    command: str

    def describe(self) -> str:
        return f"`{self.holder}` (pid {self.pid} on {self.host}, started {self.started_at})"

    @classmethod
    def parse(cls, text: str) -> LockInfo | None:
        try:
            data = json.loads(text)
            return cls(**{name: data[name] for name in cls.__dataclass_fields__})
        except (ValueError, KeyError, TypeError):
            return None


def process_start_time(pid: int) -> str | None:
    """When `pid` started, in clock ticks since boot (field 22 of /proc/PID/stat); None off Linux."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def is_stale(info: LockInfo, now: float | None = None) -> bool:
    """True when the holder is certainly (same host) or very probably (other host) gone."""
    if info.host == socket.gethostname():
        if not pid_alive(info.pid):
            return True
        started = process_start_time(info.pid)
        return info.pid_started is not None and started is not None and started != info.pid_started
    return (now or time.time()) - info.heartbeat_at > STALE_AFTER_SECONDS


class OutputLock:
    """Context manager: hold OUTPUT/engine.lock for the duration of a command."""

    def __init__(self, output: str | OutputLocation, holder: str, heartbeat_seconds: float = HEARTBEAT_SECONDS):
        self.location = output_location(output)
        self.heartbeat_seconds = heartbeat_seconds
        self.info = LockInfo(
            token=uuid.uuid4().hex,
            holder=holder,
            host=socket.gethostname(),
            pid=os.getpid(),
            pid_started=process_start_time(os.getpid()),
            started_at=datetime.now(UTC).isoformat(timespec="seconds"),
            heartbeat_at=round(time.time()),
            command=" ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]) if sys.argv else holder,
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.took_over: LockInfo | None = None  # the stale lock this one replaced, if any
        self._abandoned = False

    @property
    def token(self) -> str:
        return self.info.token

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # ------------------------------------------------------------------ acquire / release

    def acquire(self) -> None:
        try:
            self.location.makedirs()
            for _ in range(ATTEMPTS):
                if self._create():
                    self._start_heartbeat()
                    return
                current = read_lock(self.location)
                if current is None:
                    if self._unreadable_lock_is_old():
                        self._remove_stale(None)
                    else:
                        time.sleep(0.2)  # being written right now (object stores): look again
                    continue
                if not is_stale(current):
                    raise UserError(
                        f"{self.location} is in use by {current.describe()}: one run writes an output folder at "
                        f"a time; wait for it or choose another output (if it is dead, delete "
                        f"{self.location.display(LOCK_FILE)})"
                    )
                logger.warning("taking over the lock of %s, which is no longer running", current.describe())
                self._remove_stale(current)
                self.took_over = current
        except OSError as error:
            raise UserError(f"cannot write to {self.location}: {str(error).splitlines()[0]}") from None
        raise UserError(f"could not take the lock {self.location.display(LOCK_FILE)}: other runs keep taking it")

    def abandon(self) -> None:
        """Stop the heartbeat and leave the lock file: for an output that can no longer be written
        (read-only, gone, store unreachable). The next run takes it over once this process is gone."""
        self._abandoned = True
        self._stop.set()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._abandoned:
            return
        try:
            if holds_lock(self.location, self.token):
                self.location.delete(LOCK_FILE)
        except OSError as error:  # never hide the command's own outcome behind a cleanup error
            logger.warning("could not remove %s: %s", self.location.display(LOCK_FILE), error)

    # ------------------------------------------------------------------ creating

    def _content(self) -> bytes:
        return json.dumps(asdict(self.info), indent=1).encode()

    def _create(self) -> bool:
        """Create the lock if there is none; True when it is now ours."""
        if self.location.is_local:
            return self._create_local()
        if self._is_s3():
            created = self._create_s3_conditional()
            if created is not None:
                return created
        return self._create_read_back()

    def _create_local(self) -> bool:
        folder = self.location.local_path()
        temporary = folder / temporary_name(LOCK_FILE)
        temporary.write_bytes(self._content())
        try:
            os.link(temporary, folder / LOCK_FILE)  # fails if the lock exists: exclusive and complete
            return True
        except FileExistsError:
            return False
        finally:
            temporary.unlink(missing_ok=True)

    def _is_s3(self) -> bool:
        return type(self.location.fs).__name__ == "S3FileSystem"

    def _create_s3_conditional(self) -> bool | None:
        """A PUT that fails when the object exists; None when boto3 is not there to send it."""
        try:
            from botocore.exceptions import BotoCoreError, ClientError
        except ImportError:
            return None
        bucket, _, key = self.location.path(LOCK_FILE).partition("/")
        try:
            _s3_client(self.location).put_object(Bucket=bucket, Key=key, Body=self._content(), IfNoneMatch="*")
            return True
        except BotoCoreError as error:  # no credentials boto3 can find, ...: fall back to read-back
            logger.info("no conditional write on %s (%s); writing the lock and reading it back", self.location, error)
            return None
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code", "")
            if code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409"):
                return False
            if code in ("NotImplemented", "InvalidArgument"):  # an S3 clone without conditional writes
                return None
            raise OSError(str(error)) from None

    def _create_read_back(self) -> bool:
        if self.location.exists(LOCK_FILE):
            return False
        self.location.write_bytes(self._content(), LOCK_FILE)
        time.sleep(READ_BACK_WAIT_SECONDS)  # a racing writer's PUT lands in this window; the last one wins
        return holds_lock(self.location, self.token)

    def _unreadable_lock_is_old(self) -> bool:
        age = self.location.modified_age_seconds(LOCK_FILE)
        return age is not None and age > 60

    def _remove_stale(self, stale: LockInfo | None) -> None:
        if not self.location.is_local:
            self.location.delete(LOCK_FILE)  # a race here is the documented object-store limitation
            return
        # Rename it away first: of two runs taking over the same stale lock only one rename succeeds.
        aside = temporary_name(LOCK_FILE + ".stale")
        try:
            self.location.rename((LOCK_FILE,), (aside,))
        except FileNotFoundError:
            return
        moved = LockInfo.parse(self.location.read_text(aside))
        if stale is not None and (moved is None or moved.token != stale.token):
            # Another run took over in between and this moved its fresh lock: put it back.
            with contextlib.suppress(FileExistsError):
                os.link(self.location.local_path() / aside, self.location.local_path() / LOCK_FILE)
        self.location.delete(aside)

    # ------------------------------------------------------------------ heartbeat

    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="engine-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        failing = False  # warn once per streak: an output gone for good would repeat it every beat
        while not self._stop.wait(self.heartbeat_seconds):
            try:
                if not holds_lock(self.location, self.token):
                    logger.error("%s was taken over by another run; this run's files are no longer published",
                                 self.location.display(LOCK_FILE))
                    return
                self.info = LockInfo(**{**asdict(self.info), "heartbeat_at": round(time.time())})
                self.location.atomic_write(self._content(), LOCK_FILE)
                failing = False
            except OSError as error:  # a storage hiccup: try again at the next beat
                (logger.info if failing else logger.warning)("lock heartbeat failed: %s", error)
                failing = True


def read_lock(location: OutputLocation, attempts: int = 4) -> LockInfo | None:
    """The lock's content; None when there is no lock. A read that overlaps a heartbeat's rewrite
    can see a mix of old and new bytes on an object store (size from one, content from the other):
    such a read is retried, and a lock still unreadable after that is reported as None."""
    for attempt in range(attempts):
        try:
            info = LockInfo.parse(location.read_text(LOCK_FILE))
        except FileNotFoundError:
            return None
        except OSError:
            info = None
        if info is not None:
            return info
        time.sleep(0.1 * (attempt + 1))
    return None


def holds_lock(location: OutputLocation, token: str) -> bool:
    """Whether the output's lock is (still) the one with `token`."""
    current = read_lock(location)
    return current is not None and current.token == token


def lock_holder(location: OutputLocation) -> str:
    """Who holds the lock now, for messages."""
    current = read_lock(location)
    return "nobody (the lock is gone)" if current is None else current.describe()


def _s3_options(location: OutputLocation) -> dict:
    """The S3FileSystem's resolved options (endpoint, scheme, region), as pyarrow pickles them."""
    args = location.fs.__reduce__()[1]
    return args[0] if args and isinstance(args[0], dict) else {}


def _s3_client(location: OutputLocation):
    """A boto3 client for the server pyarrow talks to (credentials from the same environment)."""
    import boto3

    options = _s3_options(location)
    endpoint = options.get("endpoint_override") or None
    if endpoint and not urlsplit(endpoint).scheme:
        endpoint = f"{options.get('scheme') or 'https'}://{endpoint}"
    return boto3.client("s3", endpoint_url=endpoint, region_name=options.get("region") or None)
