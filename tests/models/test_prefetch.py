"""Downloads ahead, with a stub downloader (real downloads need the network, which tests lack):
hub models only, in the order asked, each once, nothing with HF_HUB_OFFLINE=1, a failure left to
the load, and keep_downloads false deleting only what this process downloaded."""

from __future__ import annotations

import threading

from engine.models.prefetch import Prefetcher
from engine.specs.runs import ModelSpec


def _spec(source: str, revision: str | None = None) -> ModelSpec:
    return ModelSpec(name=source, pretrained=source, revision=revision)


def _stub(fail: set[str] = frozenset()):
    fetched, deleted = [], []
    gate = threading.Event()

    def download(repo_id, revision):
        gate.wait(5)
        if repo_id in fail:
            raise OSError("connection reset")
        fetched.append((repo_id, revision))

    def delete(repo_id, revision):
        deleted.append(repo_id)
        return 4_000_000_000

    return fetched, deleted, gate, download, delete


def test_hub_models_download_in_order_once_in_the_background(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    fetched, _, gate, download, delete = _stub()
    prefetcher = Prefetcher(download, cached=lambda repo, rev: repo == "org/cached", delete=delete)
    queued = prefetcher.want([_spec("org/a"), _spec("tiny"), _spec(str(tmp_path)), _spec("org/b", "v2"),
                              _spec("org/cached")])
    assert queued == ["org/a", "org/b", "org/cached"]  # built-ins and local folders have nothing to fetch
    assert prefetcher.want([_spec("org/a"), _spec("org/b", "v2")]) == []  # asked once
    assert fetched == []  # still waiting on the (stub) network: want() never blocks
    gate.set()
    prefetcher.wait()
    assert fetched == [("org/a", None), ("org/b", "v2")]
    assert prefetcher.downloaded == {("org/a", None), ("org/b", "v2")}


def test_offline_fetches_nothing(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fetched, _, gate, download, delete = _stub()
    gate.set()
    prefetcher = Prefetcher(download, cached=lambda *a: False, delete=delete)
    assert prefetcher.want([_spec("org/a")]) == []
    prefetcher.wait()
    assert fetched == []


def test_a_failed_download_is_left_to_the_load(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    fetched, _, gate, download, delete = _stub(fail={"org/a"})
    gate.set()
    prefetcher = Prefetcher(download, cached=lambda *a: False, delete=delete)
    prefetcher.want([_spec("org/a"), _spec("org/b")])
    prefetcher.wait()
    assert fetched == [("org/b", None)] and "connection reset" in prefetcher.failed[("org/a", None)]


def test_keep_downloads_false_deletes_only_what_this_process_downloaded(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    _, deleted, gate, download, delete = _stub()
    gate.set()
    prefetcher = Prefetcher(download, cached=lambda repo, rev: repo == "org/cached", delete=delete)
    prefetcher.want([_spec("org/a"), _spec("org/cached")])
    prefetcher.wait()
    assert prefetcher.forget(_spec("org/cached")) == 0  # was there before the run: kept
    assert prefetcher.forget(_spec("org/a")) == 4_000_000_000
    assert prefetcher.forget(_spec("org/a")) == 0  # once
    assert deleted == ["org/a"]


def test_the_driver_deletes_what_the_run_downloaded_onto_its_node(monkeypatch):
    from engine.models import prefetch

    cached = {("org/old", None)}
    monkeypatch.setattr(prefetch, "is_cached", lambda repo, rev: (repo, rev) in cached)
    missing = prefetch.missing_hub_models([_spec("org/old"), _spec("org/new"), _spec("org/never"), _spec("tiny")])
    assert [s.pretrained for s in missing] == ["org/new", "org/never"]
    cached.add(("org/new", None))  # the run downloaded it; org/never was never fetched here
    deleted = []
    assert prefetch.delete_run_downloads(missing, lambda repo, rev: deleted.append(repo) or 7) == 7
    assert deleted == ["org/new"]
