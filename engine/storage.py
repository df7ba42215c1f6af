"""Where outputs live: a local folder or a URI, behind one small abstraction (OutputLocation).

Accepted: a plain path, `file:///abs/path`, `local:///abs/path` (a folder on the driver's machine
only: on a cluster every write runs on the driver's node), and object stores or remote file
systems pyarrow knows (`s3://`, `gs://`, `abfs://`, `hdfs://`); any other scheme goes through
fsspec when its package is installed (`memory://`, ...). For S3-compatible servers the standard
AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL variables name the endpoint (`?endpoint_override=` in the
URI works too); credentials come from the usual AWS variables or profile.

Writes that must never be seen half done use `atomic_write`: on a file system a hidden temporary
(`.tmp-...`) renamed into place, on an object store one PUT (an object appears whole or not at
all). Listings skip hidden names, so no reader ever sees a temporary.

Also here: whether a local path is shared between machines (a network mount), and where the
engine writes and caches on a cluster (`placement`).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pyarrow as pa
import pyarrow.fs as pafs

from engine.errors import UserError

TEMPORARY_PREFIX = ".tmp-"
LOCAL_SCHEME = "local"
# File system types whose folders other machines see too (from /proc/mounts); fuse.* counts as
# well (sshfs, s3fs, gcsfuse, juicefs...).
NETWORK_FS_TYPES = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "beegfs", "ceph", "glusterfs",
                    "9p", "virtiofs", "wekafs"}
# An actor cache on each node's own disk instead of under the output (see `placement`).
NODE_TEMP_PREFIX = "node-temp://"


@dataclass(frozen=True)
class OutputLocation:
    """A folder on some file system: `root` is its path inside `fs`; `uri` is what the user gave."""

    fs: pafs.FileSystem
    root: str
    uri: str
    driver_only: bool = False  # `local://`: a folder only the driver's machine has

    # ------------------------------------------------------------------ naming

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def local_path(self) -> Path:
        if not self.is_local:
            raise ValueError(f"{self.uri} is not on the local file system")
        return Path(self.root)

    def path(self, *parts: str) -> str:
        """The fs path of a file or folder under the root."""
        return str(PurePosixPath(self.root, *parts)) if parts else self.root

    def child(self, *parts: str) -> OutputLocation:
        uri = self.uri.rstrip("/") + "/" + "/".join(parts)
        return OutputLocation(self.fs, self.path(*parts), uri, self.driver_only)

    def display(self, *parts: str) -> str:
        """How to name a file under the root in a message."""
        return self.uri.rstrip("/") + "/" + "/".join(parts) if parts else self.uri

    def __str__(self) -> str:
        return self.uri

    # ------------------------------------------------------------------ queries

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def is_dir(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type == pafs.FileType.Directory

    def list_files(self, *parts: str, suffix: str = "", hidden: bool = False) -> list[str]:
        """Names of the files directly in a folder (sorted; none when it does not exist). Hidden
        names (temporaries, the lock's helpers) only with `hidden`."""
        selector = pafs.FileSelector(self.path(*parts), allow_not_found=True, recursive=False)
        names = []
        for info in self.fs.get_file_info(selector):
            if info.type != pafs.FileType.File or not info.base_name.endswith(suffix):
                continue
            if info.base_name.startswith(".") != hidden:
                continue
            names.append(info.base_name)
        return sorted(names)

    def modified_age_seconds(self, *parts: str) -> float | None:
        info = self.fs.get_file_info(self.path(*parts))
        if info.type == pafs.FileType.NotFound or info.mtime is None:
            return None
        return max(0.0, time.time() - info.mtime.timestamp())

    # ------------------------------------------------------------------ reading and writing

    def makedirs(self, *parts: str) -> None:
        if self.renames_atomically:  # object stores have no folders: a key's prefix is enough
            self.fs.create_dir(self.path(*parts), recursive=True)

    def open_input(self, *parts: str) -> pa.NativeFile:
        return self.fs.open_input_file(self.path(*parts))

    def read_bytes(self, *parts: str) -> bytes:
        with self.fs.open_input_stream(self.path(*parts)) as stream:
            return stream.read()

    def read_text(self, *parts: str) -> str:
        return self.read_bytes(*parts).decode("utf-8")

    def write_bytes(self, data: bytes, *parts: str) -> None:
        """A plain write (on a file system, a crash can leave part of it: see atomic_write)."""
        path = self.path(*parts)
        if self.renames_atomically:  # object stores have no folders to make
            self.fs.create_dir(str(PurePosixPath(path).parent), recursive=True)
        with self.fs.open_output_stream(path) as stream:
            stream.write(data)

    def atomic_write(self, data: bytes, *parts: str) -> None:
        """Readers see the old content or the new, never part of it."""
        if not self.renames_atomically:
            self.write_bytes(data, *parts)  # one PUT: the object appears whole or not at all
            return
        *folder, name = parts
        temporary = (*folder, temporary_name(name))
        self.write_bytes(data, *temporary)
        try:
            self.fs.move(self.path(*temporary), self.path(*parts))
        except BaseException:
            self.delete(*temporary)
            raise

    def delete(self, *parts: str) -> bool:
        """Delete a file; False when it was not there."""
        try:
            self.fs.delete_file(self.path(*parts))
            return True
        except FileNotFoundError:
            return False

    def rename(self, source: tuple[str, ...], target: tuple[str, ...]) -> None:
        self.fs.move(self.path(*source), self.path(*target))

    @property
    def renames_atomically(self) -> bool:
        """True on file systems (POSIX rename); object stores have no rename, a PUT is atomic instead."""
        return self.is_local or _is_posix_like(self.fs)


def temporary_name(name: str) -> str:
    """A hidden, unique name beside `name`: readers skip it, and it still ends like the final file."""
    return f"{TEMPORARY_PREFIX}{uuid.uuid4().hex[:12]}-{name}"


def _is_posix_like(fs: pafs.FileSystem) -> bool:
    if isinstance(fs, pafs.PyFileSystem):
        protocol = getattr(getattr(fs.handler, "fs", None), "protocol", "")
        protocols = protocol if isinstance(protocol, (tuple, list)) else (protocol,)
        return any(p in ("file", "local", "memory", "sftp", "ssh") for p in protocols)
    return type(fs).__name__ in ("HadoopFileSystem",)


# --------------------------------------------------------------------------- parsing


def output_location(value: str | Path | OutputLocation) -> OutputLocation:
    """A local path or URI -> OutputLocation. Raises UserError for a scheme nothing can open."""
    if isinstance(value, OutputLocation):
        return value
    text = str(value)
    scheme = urlsplit(text).scheme.lower() if "://" in text else ""
    if not scheme:
        path = Path(text).expanduser().resolve()
        return OutputLocation(pafs.LocalFileSystem(), path.as_posix(), str(path))
    if scheme in ("file", LOCAL_SCHEME):
        parts = urlsplit(text)
        path = Path(parts.path or "/")
        if parts.netloc not in ("", "localhost"):
            raise UserError(f"{text}: a {scheme}:// output needs an absolute path ({scheme}:///abs/folder)")
        return OutputLocation(pafs.LocalFileSystem(), path.as_posix(), text, driver_only=scheme == LOCAL_SCHEME)
    uri = with_s3_endpoint(text) if scheme in ("s3", "s3a") else text
    try:
        fs, root = pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
        fs, root = _fsspec_filesystem(text, scheme)
    except OSError as error:  # e.g. a bucket that does not exist, credentials that do not work
        raise UserError(f"cannot open {text}: {str(error).splitlines()[0]}") from None
    return OutputLocation(fs, root.rstrip("/") or root, text.rstrip("/"))


def with_s3_endpoint(uri: str) -> str:
    """Put AWS_ENDPOINT_URL_S3 (or AWS_ENDPOINT_URL) into an s3:// URI as pyarrow's
    endpoint_override, unless the URI names one: S3-compatible servers (MinIO, Ceph, a test's
    moto) are found the way the AWS tools find them, on any pyarrow version."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    parts = urlsplit(uri)
    query = dict(parse_qsl(parts.query))
    if not endpoint or "endpoint_override" in query:
        return uri
    endpoint_parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
    query.setdefault("endpoint_override", endpoint_parts.netloc)
    query.setdefault("scheme", endpoint_parts.scheme)
    return urlunsplit(parts._replace(query=urlencode(query)))


def _fsspec_filesystem(text: str, scheme: str) -> tuple[pafs.FileSystem, str]:
    try:
        from fsspec.core import url_to_fs

        filesystem, root = url_to_fs(text)
    except (ImportError, ValueError) as error:
        known = "s3, gs, abfs, hdfs, file, local"
        raise UserError(f"{text}: no file system for {scheme}:// ({error}); use a local path or {known}") from None
    return pafs.PyFileSystem(pafs.FSSpecHandler(filesystem)), root


# --------------------------------------------------------------------------- shared or not


def mount_type(path: Path, mounts_text: str | None = None) -> str | None:
    """The file system type of the mount holding `path` (longest mount point that contains it),
    from /proc/mounts; None where that cannot be read (not Linux)."""
    if mounts_text is None:
        try:
            mounts_text = Path("/proc/mounts").read_text()
        except OSError:
            return None
    best, best_type = "", None
    target = Path(path).as_posix()
    for line in mounts_text.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")
        inside = target == point or target.startswith(point.rstrip("/") + "/") or point == "/"
        if inside and len(point) >= len(best):
            best, best_type = point, fields[2]
    return best_type


def is_network_mount(path: Path, mounts_text: str | None = None) -> bool:
    kind = mount_type(path, mounts_text)
    return kind is not None and (kind in NETWORK_FS_TYPES or kind.startswith("fuse."))


@dataclass(frozen=True)
class Placement:
    """Where a run's files are written and its actors cache, and why (one line, for log and manifest)."""

    driver_writes: bool  # every write task runs on the driver's node
    cache_dir: str  # a folder every actor can use, or NODE_TEMP_PREFIX + key: each node's temp folder
    reason: str

    @property
    def node_caches(self) -> bool:
        return self.cache_dir.startswith(NODE_TEMP_PREFIX)

    def describe(self) -> dict[str, str | bool]:
        return {"writes_on_driver_node": self.driver_writes, "cache": self.cache_dir, "reason": self.reason}


def placement(location: OutputLocation, multi_node: bool, shared: bool = False) -> Placement:
    """The rule for outputs on a cluster:
    - object store: written from any node; caches on each node's disk (probes need POSIX folders);
    - `local://`, or a local path on several nodes that is neither --shared-output nor a network
      mount: written by tasks on the driver's node, caches on each node's disk;
    - otherwise (one machine, or a shared folder): written from any node, caches in OUTPUT/cache.
    """
    node_cache = NODE_TEMP_PREFIX + hashlib.sha256(location.uri.encode()).hexdigest()[:16]
    if not location.is_local:
        return Placement(False, node_cache, "object store: any node writes; caches on each node's temp disk")
    shared_cache = location.path("cache")
    if location.driver_only:
        cache = node_cache if multi_node else shared_cache
        return Placement(True, cache, "local:// output: written on the driver's node")
    if not multi_node:
        return Placement(False, shared_cache, "single machine")
    if shared:
        return Placement(False, shared_cache, "--shared-output: every node sees this folder")
    kind = mount_type(location.local_path())
    if kind is not None and is_network_mount(location.local_path()):
        return Placement(False, shared_cache, f"network mount ({kind}): every node sees this folder")
    return Placement(
        True, node_cache, "local path on a multi-node cluster: written on the driver's node, caches on each node's "
        "temp disk (--shared-output if every node sees this folder)"
    )


def cache_folder(value: str) -> Path:
    """The actor side of Placement.cache_dir: a folder on this node."""
    if value.startswith(NODE_TEMP_PREFIX):
        return Path(tempfile.gettempdir()) / "engine-cache" / value[len(NODE_TEMP_PREFIX):]
    return Path(value)
