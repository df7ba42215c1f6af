"""Which components of a pipeline hold the same weights as one already loaded: content identities.

A component (unet, vae, text_encoder, tokenizer) is identified by what its files hold:
- in a Hugging Face hub snapshot, every file is a symlink to `blobs/<name>`, and the blob's name is
  the SHA-256 of an LFS file (the git SHA-1 of a small one): the identity costs no read at all;
- in a local folder, a `.safetensors` file is hashed tensor by tensor (name, dtype, shape, bytes;
  so the same tensors saved with other metadata match) and any other file by its bytes. Hashes are
  computed once and cached beside the folder (`.engine-content-hashes.json`), or, when the folder is
  read-only, in the engine's cache folder; a file whose size or mtime changed is hashed again.

A component's identity is the SHA-256 of its files' (relative name, identity) pairs, config
included, so two components are shared only when their configs and weights are equal. Built-in
models (made in code, no files) are identified from their tensors in memory (engine.models.cache).
Never imports torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from pathlib import Path

logger = logging.getLogger(__name__)

SHARED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer")
HASH_FILE = ".engine-content-hashes.json"
READ_CHUNK = 1 << 24


def component_identities(folder: Path, allow_pickle: bool = False) -> dict[str, str]:
    """{component: identity} for the shareable components of a pipeline folder or hub snapshot."""
    folder = Path(folder)
    hashes = _HashCache(folder)
    identities = {}
    for component in SHARED_COMPONENTS:
        sub = folder / component
        if not sub.is_dir():
            continue
        files = sorted(p for p in sub.rglob("*") if p.is_file() and _counts(p, allow_pickle))
        if not files:
            continue
        digest = hashlib.sha256()
        for path in files:
            digest.update(f"{path.relative_to(sub).as_posix()}={hashes.identity(path)}\n".encode())
        identities[component] = digest.hexdigest()
    hashes.save()
    return identities


def folder_identity(path: str | Path, allow_pickle: bool = False) -> str:
    """The identity of a UNet override: a UNet folder, a pipeline folder's unet/, or one weights file."""
    path = Path(path)
    if path.is_file():
        hashes = _HashCache(path.parent)
        identity = hashes.identity(path)
        hashes.save()
        return f"file:{identity}"
    if (path / "unet" / "config.json").exists():
        path = path / "unet"
    hashes = _HashCache(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and _counts(p, allow_pickle)):
        digest.update(f"{file.relative_to(path).as_posix()}={hashes.identity(file)}\n".encode())
    hashes.save()
    return digest.hexdigest()


def _counts(path: Path, allow_pickle: bool) -> bool:
    """Files that decide what loads: not our hash cache, not pickle weights when pickle is refused
    (diffusers then loads the safetensors beside them)."""
    if path.name == HASH_FILE or path.name.startswith("."):
        return False
    return allow_pickle or path.suffix not in (".bin", ".ckpt", ".pt", ".pth", ".pkl")


def blob_name(path: Path) -> str | None:
    """The hub cache's blob name a snapshot file links to (its content hash), or None."""
    if not path.is_symlink():
        return None
    target = Path(os.readlink(path))
    return target.name if target.parent.name == "blobs" else None


def safetensors_digest(path: Path) -> str:
    """SHA-256 over each tensor's (name, dtype, shape, bytes), in name order; metadata ignored."""
    with path.open("rb") as handle:
        (header_size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_size))
        start = 8 + header_size
        digest = hashlib.sha256()
        for name in sorted(k for k in header if k != "__metadata__"):
            info = header[name]
            begin, end = info["data_offsets"]
            digest.update(f"{name}|{info['dtype']}|{info['shape']}|".encode())
            handle.seek(start + begin)
            left = end - begin
            while left > 0:
                chunk = handle.read(min(left, READ_CHUNK))
                if not chunk:
                    raise ValueError(f"{path}: truncated safetensors file")
                digest.update(chunk)
                left -= len(chunk)
    return digest.hexdigest()


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(READ_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def hash_cache_dir() -> Path:
    """Where hashes of read-only folders are kept: $ENGINE_CACHE_DIR, else ~/.cache/erasure-probe-engine."""
    root = os.environ.get("ENGINE_CACHE_DIR") or Path.home() / ".cache" / "erasure-probe-engine"
    return Path(root) / "content-hashes"


class _HashCache:
    """Content hashes of one folder's files, keyed by relative path and checked by size and mtime."""

    def __init__(self, folder: Path):
        self.folder = folder.resolve()
        self.beside = self.folder / HASH_FILE
        self.elsewhere = hash_cache_dir() / f"{hashlib.sha256(str(self.folder).encode()).hexdigest()[:32]}.json"
        self.entries: dict[str, dict] = {}
        for candidate in (self.beside, self.elsewhere):
            try:
                self.entries = json.loads(candidate.read_text())
                break
            except (OSError, ValueError):
                continue
        self.changed = False

    def identity(self, path: Path) -> str:
        blob = blob_name(path)
        if blob is not None:
            return f"blob:{blob}"
        stat = path.stat()
        key = path.resolve().relative_to(self.folder).as_posix() if path.resolve().is_relative_to(
            self.folder) else str(path.resolve())
        entry = self.entries.get(key)
        if entry and entry["size"] == stat.st_size and entry["mtime_ns"] == stat.st_mtime_ns:
            return entry["sha256"]
        digest = safetensors_digest(path) if path.suffix == ".safetensors" else file_digest(path)
        self.entries[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
        self.changed = True
        return digest

    def save(self) -> None:
        if not self.changed:
            return
        text = json.dumps(self.entries, indent=1, sort_keys=True)
        for target in (self.beside, self.elsewhere):
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
                temporary.write_text(text)
                temporary.replace(target)
                self.changed = False
                return
            except OSError:
                continue  # read-only folder: the engine's cache folder instead
        logger.warning("could not cache content hashes of %s (read-only everywhere)", self.folder)
