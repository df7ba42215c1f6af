"""Downloads ahead: a probe actor's node fetches (does not load) the hub models of its coming units
into the node's Hugging Face cache in a background thread, one or two models ahead, so the GPU
does not wait on the network. With HF_HUB_OFFLINE=1 nothing is fetched (a missing model was
reported before the run started). Local folders and built-ins have nothing to fetch.

Two actors of one node may ask for the same model: huggingface_hub's file locks make the second
wait for the first's files instead of downloading them again.

`keep_downloads: false`: a snapshot this process downloaded is deleted (`forget`) once the run has
no unit of its model left to claim (engine.pipeline.affinity). Real downloads cannot be tested
without network access; the tests use a stub downloader.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path

from engine.models.builtin import BUILTIN_MODELS
from engine.specs.runs import ModelSpec

logger = logging.getLogger(__name__)

Downloader = Callable[[str, str | None], None]


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def is_hub_model(spec: ModelSpec) -> bool:
    return spec.pretrained not in BUILTIN_MODELS and not Path(spec.pretrained).exists()


def is_cached(repo_id: str, revision: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "model_index.json", revision=revision), str)


def hub_download(repo_id: str, revision: str | None) -> None:
    """The files a diffusers load of the pipeline reads (safetensors weights), into the hub cache."""
    from diffusers import DiffusionPipeline

    # safety_checker=None as the load passes it: diffusers then skips that folder (1.2 GB for SD 1.x).
    DiffusionPipeline.download(repo_id, revision=revision, use_safetensors=True, safety_checker=None)


def delete_snapshot(repo_id: str, revision: str | None) -> int:
    """Delete the cached snapshot of `repo_id` (at `revision`, else every revision); bytes freed."""
    from huggingface_hub import scan_cache_dir

    info = scan_cache_dir()
    commits = [r.commit_hash for repo in info.repos if repo.repo_id == repo_id and repo.repo_type == "model"
               for r in repo.revisions if revision is None or revision in (r.commit_hash, *r.refs)]
    if not commits:
        return 0
    strategy = info.delete_revisions(*commits)
    strategy.execute()
    return int(strategy.expected_freed_size)


def missing_hub_models(specs: list[ModelSpec]) -> list[ModelSpec]:
    """The hub models among `specs` not in this node's cache now (keep_downloads false: the driver
    deletes on its own node, after the run, the ones that are there by then)."""
    return [s for s in specs if is_hub_model(s) and not is_cached(s.pretrained, s.revision)]


def delete_run_downloads(missing_before: list[ModelSpec],
                         delete: Callable[[str, str | None], int] = delete_snapshot) -> int:
    """Delete the snapshots of `missing_before` that the run downloaded onto this node; bytes freed.
    An actor deletes each model it leaves behind; this catches each actor's last model."""
    freed = 0
    for spec in missing_before:
        if is_cached(spec.pretrained, spec.revision):
            freed += delete(spec.pretrained, spec.revision)
    if freed:
        logger.info("keep_downloads false: deleted %.2f GB of snapshots this run downloaded", freed / 1e9)
    return freed


class Prefetcher:
    """One background thread downloading the hub models asked for, in the order asked, each once."""

    def __init__(self, download: Downloader = hub_download, cached: Callable[[str, str | None], bool] = is_cached,
                 delete: Callable[[str, str | None], int] = delete_snapshot):
        self.download = download
        self.cached = cached
        self.delete = delete
        self.asked: set[tuple[str, str | None]] = set()
        self.downloaded: set[tuple[str, str | None]] = set()  # fetched by this process (keep_downloads)
        self.failed: dict[tuple[str, str | None], str] = {}
        self._queue: queue.Queue[tuple[str, str | None] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def want(self, specs: list[ModelSpec]) -> list[str]:
        """Queue the hub models among `specs` not asked for before; returns the repo ids queued."""
        if offline():
            return []
        queued = []
        with self._lock:
            for spec in specs:
                key = (spec.pretrained, spec.revision)
                if not is_hub_model(spec) or key in self.asked:
                    continue
                self.asked.add(key)
                self._queue.put(key)
                queued.append(spec.pretrained)
            if queued and self._thread is None:
                self._thread = threading.Thread(target=self._work, name="model-downloads", daemon=True)
                self._thread.start()
        return queued

    def forget(self, spec: ModelSpec) -> int:
        """keep_downloads false: delete `spec`'s snapshot if this process downloaded it; bytes freed."""
        key = (spec.pretrained, spec.revision)
        if key not in self.downloaded:
            return 0
        self.downloaded.discard(key)
        freed = self.delete(*key)
        logger.info("deleted the downloaded snapshot of %s (%.2f GB)", spec.pretrained, freed / 1e9)
        return freed

    def wait(self) -> None:
        """Block until every queued download is finished (tests; the end of an actor's work)."""
        self._queue.join()

    def _work(self) -> None:
        while True:
            key = self._queue.get()
            if key is None:
                self._queue.task_done()
                return
            try:
                if self.cached(*key):
                    continue
                logger.info("downloading %s ahead of its units", key[0])
                self.download(*key)
                self.downloaded.add(key)
            except Exception as error:  # noqa: BLE001 - a failed prefetch is retried by the load itself
                self.failed[key] = f"{type(error).__name__}: {error}"
                logger.warning("downloading %s ahead failed (%s); it loads when its unit runs", key[0], error)
            finally:
                self._queue.task_done()
