"""Reading what W&B wrote offline: a run folder's `run-ID.wandb` file, the log W&B syncs later.

W&B 0.31 reads it only in its Go core, so the tests read it here: LevelDB's log format (32 KiB
blocks of chunks, each with a 7-byte header: CRC, length, type) after W&B's 7-byte file header,
each record a `wandb_internal_pb2.Record`. A W&B release that changes the format fails these
tests loudly at the header check.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

_BLOCK = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def wandb_log_records(path: Path) -> list[Any]:
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} does not start with W&B's header"
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        if _BLOCK - pos % _BLOCK < 7:  # a block's tail too short for a header is padding
            pos += _BLOCK - pos % _BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def offline_run(folder: Path) -> dict[str, Any]:
    """What one offline run folder holds: its name, project, group, tags, config, summary and artifacts."""
    [log] = folder.glob("run-*.wandb")
    run: dict[str, Any] = {"config": {}, "summary": {}, "artifacts": []}
    for record in wandb_log_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.update(name=record.run.display_name, project=record.run.project, group=record.run.run_group,
                       tags=list(record.run.tags), job_type=record.run.job_type)
            run["config"].update({item.key: json.loads(item.value_json) for item in record.run.config.update})
        elif kind == "config":
            run["config"].update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "summary":
            for item in record.summary.update:
                run["summary"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "artifact":
            run["artifacts"].append({"name": record.artifact.name, "type": record.artifact.type,
                                     "files": sorted(entry.path for entry in record.artifact.manifest.contents)})
    return run


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """W&B writing offline into tmp_path/wandb (the engine's default mode, said explicitly);
    returns a function listing the offline runs written there, read back from their logs."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    for name in ("WANDB_PROJECT", "WANDB_API_KEY", "WANDB_ENTITY"):
        monkeypatch.delenv(name, raising=False)

    def runs() -> list[dict[str, Any]]:
        return [offline_run(folder) for folder in sorted((tmp_path / "wandb").glob("offline-run-*"))]

    return runs
