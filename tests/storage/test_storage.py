"""Outputs anywhere: OutputLocation over local folders, file://, local://, fsspec and S3; which
folders count as shared; where a run writes and caches; and a whole run, resume, score and report
on an S3 bucket served by moto on 127.0.0.1."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pytest

from engine.errors import UserError
from engine.lock import LOCK_FILE, OutputLock
from engine.results import ROWS_DIR, parquet_files, read_manifest, read_rows, table_bytes
from engine.storage import (
    NODE_TEMP_PREFIX,
    cache_folder,
    is_network_mount,
    mount_type,
    output_location,
    placement,
    with_s3_endpoint,
)

ROOT = Path(__file__).resolve().parents[2]

# --------------------------------------------------------------------------- OutputLocation


def test_local_location_writes_atomically_and_hides_temporaries(tmp_path):
    location = output_location(tmp_path / "out")
    assert location.is_local and location.renames_atomically and location.uri == str(tmp_path / "out")
    location.atomic_write(b"first", "rows", "a.parquet")
    location.atomic_write(b"second", "rows", "a.parquet")  # replaces whole
    location.write_bytes(b"half", "rows", ".tmp-1234-b.parquet")
    assert location.read_bytes("rows", "a.parquet") == b"second"
    assert location.list_files("rows", suffix=".parquet") == ["a.parquet"]
    assert location.list_files("rows", hidden=True) == [".tmp-1234-b.parquet"]
    assert location.list_files("missing") == []
    rows = location.child("rows")
    assert rows.uri == f"{tmp_path / 'out'}/rows" and rows.exists("a.parquet") and location.is_dir("rows")
    assert location.delete("rows", "a.parquet") and not location.delete("rows", "a.parquet")


def test_readers_ignore_temporaries(tmp_path):
    location = output_location(tmp_path)
    table = pa.table({"row_id": ["r1"]})
    location.atomic_write(table_bytes(table), ROWS_DIR, "done.parquet")
    location.write_bytes(b"PAR1 half a file", ROWS_DIR, ".tmp-0-torn.parquet")
    assert parquet_files(tmp_path) == ["done.parquet"]
    assert read_rows(tmp_path, columns=["row_id"]).column("row_id").to_pylist() == ["r1"]


@pytest.mark.parametrize("scheme", ["file", "local"])
def test_file_and_local_uris_are_local_folders(tmp_path, scheme):
    location = output_location(f"{scheme}://{tmp_path}/out")
    assert location.is_local and location.root == f"{tmp_path}/out"
    assert location.driver_only == (scheme == "local")
    location.atomic_write(b"x", "f.txt")
    assert (tmp_path / "out" / "f.txt").read_bytes() == b"x"


@pytest.mark.parametrize(
    "uri, expected",
    [
        ("local://relative/folder", "needs an absolute path"),
        ("nosuchscheme://bucket/run", "no file system for nosuchscheme://"),
    ],
)
def test_unusable_outputs_are_user_errors(uri, expected):
    with pytest.raises(UserError, match=expected):
        output_location(uri)


def test_other_schemes_go_through_fsspec():
    location = output_location("memory://engine-test/run")
    location.atomic_write(b"{}", "manifest.json")
    assert location.read_text("manifest.json") == "{}" and not location.is_local
    assert location.list_files() == ["manifest.json"]


def test_s3_endpoint_comes_from_the_aws_variable(monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9000")
    assert with_s3_endpoint("s3://bucket/run") == "s3://bucket/run?endpoint_override=127.0.0.1%3A9000&scheme=http"
    # One named in the URI wins.
    assert with_s3_endpoint("s3://b/r?endpoint_override=h:1") == "s3://b/r?endpoint_override=h:1"
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    assert with_s3_endpoint("s3://bucket/run") == "s3://bucket/run"


# --------------------------------------------------------------------------- shared folders and placement

MOUNTS = """\
/dev/sda1 / ext4 rw 0 0
server:/export /mnt ext4 rw 0 0
server:/export /mnt/shared nfs4 rw 0 0
/dev/sdb1 /mnt/shared/scratch xfs rw 0 0
me@host:/data /mnt/ssh\\040fs fuse.sshfs rw 0 0
"""


@pytest.mark.parametrize(
    "path, kind, network",
    [
        ("/home/me/run", "ext4", False),
        ("/mnt/shared/run", "nfs4", True),
        ("/mnt/shared", "nfs4", True),
        ("/mnt/shared/scratch/run", "xfs", False),  # the longest mount point holding the path decides
        ("/mnt/sharedness/run", "ext4", False),  # a name prefix is not a folder prefix
        ("/mnt/ssh fs/run", "fuse.sshfs", True),
    ],
)
def test_network_mounts_are_recognised(path, kind, network):
    assert mount_type(Path(path), MOUNTS) == kind
    assert is_network_mount(Path(path), MOUNTS) == network


def test_placement_rules(tmp_path):
    local = output_location(tmp_path / "out")
    single = placement(local, multi_node=False)
    assert not single.driver_writes and single.cache_dir == f"{tmp_path}/out/cache"
    several = placement(local, multi_node=True)  # tmp_path is on a local disk here
    assert several.driver_writes and several.cache_dir.startswith(NODE_TEMP_PREFIX)
    shared = placement(local, multi_node=True, shared=True)
    assert not shared.driver_writes and shared.cache_dir == f"{tmp_path}/out/cache"
    pinned = placement(output_location(f"local://{tmp_path}/out"), multi_node=True)
    assert pinned.driver_writes and pinned.cache_dir.startswith(NODE_TEMP_PREFIX)
    remote = placement(output_location("memory://engine-test/placement"), multi_node=True)
    assert not remote.driver_writes and remote.cache_dir.startswith(NODE_TEMP_PREFIX)


def test_node_cache_is_a_folder_on_the_node(tmp_path):
    key = placement(output_location("memory://engine-test/cache"), multi_node=True).cache_dir
    assert cache_folder(key) == Path(tempfile.gettempdir()) / "engine-cache" / key.removeprefix(NODE_TEMP_PREFIX)
    assert cache_folder(str(tmp_path / "cache")) == tmp_path / "cache"


# --------------------------------------------------------------------------- S3 (moto server)

AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def s3_bucket():
    """A real S3 API (moto's server) on 127.0.0.1 with bucket `engine`; the AWS variables point at it."""
    moto_server = pytest.importorskip("moto.server", reason="moto[server] is in the test extra")
    import boto3

    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    saved = {k: os.environ.get(k) for k in [*AWS_ENV, "AWS_ENDPOINT_URL_S3"]}
    os.environ.update(AWS_ENV, AWS_ENDPOINT_URL_S3=f"http://127.0.0.1:{port}")
    try:
        boto3.client("s3").create_bucket(Bucket="engine")
        yield "s3://engine"
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


def _engine_run(output: str, *extra: str) -> subprocess.CompletedProcess:
    """`engine run` in its own process: its Ray workers get the AWS variables (WORKER_ENV passthrough)."""
    command = [sys.executable, "-m", "engine.cli", "run", "--model", "tiny", "--concept", "church",
               "--probe", "standard_prompt", "--num-images", "3", "--batch-size", "1", "--output", output,
               "--probe-param", "standard_prompt.num_inference_steps=2", "--set", "judges=[clip:tiny]", *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": "local"}
    return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)


def test_lock_on_s3_refuses_a_second_writer(s3_bucket, monkeypatch):
    location = output_location(f"{s3_bucket}/locked")
    with OutputLock(location, "engine run"):
        holder = json.loads(location.read_text(LOCK_FILE))
        with pytest.raises(UserError, match=f"in use by `engine run` \\(pid {os.getpid()}"):
            OutputLock(location, "engine score").acquire()
        # Without conditional writes (no boto3): write, wait, read back; the live lock still wins.
        monkeypatch.setattr(OutputLock, "_create_s3_conditional", lambda self: None)
        with pytest.raises(UserError, match="in use by"):
            OutputLock(location, "engine score").acquire()
        assert json.loads(location.read_text(LOCK_FILE))["token"] == holder["token"]
    assert not location.exists(LOCK_FILE)
    with OutputLock(location, "engine run"):  # the read-back path takes a free lock
        assert location.exists(LOCK_FILE)


@pytest.mark.slow
def test_run_resume_score_and_report_on_s3(s3_bucket):
    from engine.report.build import build_report
    from engine.scoring.rescore import rescore_run

    output = f"{s3_bucket}/runs/first"
    done = _engine_run(output)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert f"3 rows generated, 0 already done, 3 in {output}" in done.stdout
    location = output_location(output)
    assert read_rows(output).num_rows == 3 and not location.exists(LOCK_FILE)
    assert location.list_files(ROWS_DIR, hidden=True) == []
    manifest = read_manifest(output)
    assert manifest["status"] == "complete" and manifest["storage"]["writes_on_driver_node"] is False

    # Resume: rows lost from the bucket are made again, nothing else.
    kept = read_rows(output).slice(0, 1)
    for name in parquet_files(output):
        location.delete(ROWS_DIR, name)
    location.atomic_write(table_bytes(kept), ROWS_DIR, "kept.parquet")
    resumed = _engine_run(output)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert "2 rows generated, 1 already done" in resumed.stdout
    ids = read_rows(output, columns=["row_id"]).column("row_id").to_pylist()
    assert len(ids) == 3 and len(set(ids)) == 3

    # Score in place on the bucket, then a report uploaded beside the rows.
    summary = rescore_run(output, ["imagenet:tiny"], "cpu")
    assert summary.rows == 3 and summary.files == len(parquet_files(output))
    rows = read_rows(output).to_pylist()
    assert {r["judge_model"] for r in rows} == {"imagenet:tiny/random-seed0"}
    assert {r["clip_model"] for r in rows} == {"clip:tiny-clip/random-seed0"}  # the stream's scores stay
    assert read_manifest(output)["scoring_history"][0]["judges"] == ["imagenet:tiny/random-seed0"]
    content = build_report([output])
    assert content.output == f"{output}/report" and content.rows == 3
    report = output_location(content.output)
    assert report.exists("report.html") and report.exists("summary.csv")
    assert b"data:image/png;base64" in report.read_bytes("report.html")
    assert [str(path).startswith(f"{output}/report/sheets/") for _, path in content.sheets] == [True]
