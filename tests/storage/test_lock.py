"""One writer per output folder: the lock names its holder, refuses a live one, takes over a dead
one; files are published whole and only while their run holds the lock; two `engine run`s into one
folder and a driver killed mid-run both end with every row exactly once."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import pyarrow as pa
import pytest
from typer.testing import CliRunner

from engine.cli import app
from engine.errors import UserError
from engine.lock import LOCK_FILE, STALE_AFTER_SECONDS, LockInfo, OutputLock, process_start_time, read_lock
from engine.pipeline.sink import WRITER_KEY, LockLost, publish_rows, writer_info
from engine.results import ROWS_DIR, parquet_files, read_rows
from engine.storage import output_location

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


def _lock_file(folder: Path, **changes) -> LockInfo:
    """Write a lock as another run would have, with `changes` to the fields."""
    info = LockInfo(token="other-run", holder="engine run", host=socket.gethostname(), pid=os.getpid(),
                    pid_started=process_start_time(os.getpid()), started_at="2026-01-01T00:00:00+00:00",
                    heartbeat_at=time.time(), command="engine run ...")
    info = replace(info, **changes)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_FILE).write_text(json.dumps(asdict(info)))
    return info


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


# --------------------------------------------------------------------------- the lock


def test_lock_names_its_holder_and_refuses_a_second_writer(tmp_path):
    with OutputLock(tmp_path, "engine run") as lock:
        content = json.loads((tmp_path / LOCK_FILE).read_text())
        assert content["token"] == lock.token and content["holder"] == "engine run"
        assert content["pid"] == os.getpid() and content["host"] == socket.gethostname()
        assert content["started_at"] and content["command"]
        with pytest.raises(UserError) as refused:
            OutputLock(tmp_path, "engine score").acquire()
        message = str(refused.value)
        assert "\n" not in message
        assert f"in use by `engine run` (pid {os.getpid()} on {socket.gethostname()}, started" in message
        assert str(tmp_path / LOCK_FILE) in message
        assert read_lock(output_location(tmp_path)).token == lock.token  # the refused one changed nothing
    assert os.listdir(tmp_path) == []  # released, and no helper file left behind


def test_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path):
    stale = _lock_file(tmp_path, pid=_dead_pid(), pid_started=None)
    with OutputLock(tmp_path, "engine run") as lock:
        assert lock.took_over == stale
        assert read_lock(output_location(tmp_path)).token == lock.token


@pytest.mark.skipif(process_start_time(os.getpid()) is None, reason="process start times need /proc (Linux)")
def test_a_reused_pid_is_not_the_holder(tmp_path):
    _lock_file(tmp_path, pid_started="1")  # this process's pid, but a process started at another time
    with OutputLock(tmp_path, "engine run") as lock:
        assert lock.took_over is not None


def test_lock_from_another_host_is_kept_while_its_heartbeat_is_fresh(tmp_path):
    _lock_file(tmp_path, host="other-host", heartbeat_at=time.time() - 30)
    with pytest.raises(UserError, match=r"in use by `engine run` \(pid \d+ on other-host"):
        OutputLock(tmp_path, "engine run").acquire()
    _lock_file(tmp_path, host="other-host", heartbeat_at=time.time() - STALE_AFTER_SECONDS - 60)
    with OutputLock(tmp_path, "engine run") as lock:
        assert lock.took_over.host == "other-host"


def test_an_old_unreadable_lock_is_taken_over(tmp_path):
    (tmp_path / LOCK_FILE).write_text("")  # e.g. a lock file truncated by a full disk
    old = time.time() - 3600
    os.utime(tmp_path / LOCK_FILE, (old, old))
    with OutputLock(tmp_path, "engine run") as lock:
        assert read_lock(output_location(tmp_path)).token == lock.token


def test_heartbeat_refreshes_the_lock(tmp_path):
    with OutputLock(tmp_path, "engine run", heartbeat_seconds=0.05):
        first = read_lock(output_location(tmp_path)).heartbeat_at
        deadline = time.time() + 30
        while read_lock(output_location(tmp_path)).heartbeat_at == first and time.time() < deadline:
            time.sleep(0.1)
        assert read_lock(output_location(tmp_path)).heartbeat_at > first


# --------------------------------------------------------------------------- publishing files


def test_files_are_published_whole_and_only_under_the_writers_lock(tmp_path):
    output = output_location(tmp_path)
    table = pa.table({"row_id": ["a", "b"]})
    with OutputLock(output, "engine run") as lock:
        written = publish_rows(output, table, lock.token, node_id="node-1")
        assert parquet_files(output) == [written["file"]]
        assert writer_info(output, written["file"]) == {
            "node_id": "node-1", "host": socket.gethostname(), "pid": os.getpid(), "rows": 2}
        # A write task of a run that lost the lock publishes nothing, and leaves nothing behind.
        with pytest.raises(LockLost, match="no longer holds the output's lock"):
            publish_rows(output, table, "token-of-a-dead-run", node_id="node-1")
    assert sorted(os.listdir(tmp_path / ROWS_DIR)) == [written["file"]]
    assert WRITER_KEY == b"engine.writer"


# --------------------------------------------------------------------------- whole runs

RUN_ARGS = ["--model", "tiny", "--concept", "church", "--probe", "standard_prompt", "--batch-size", "1",
            "--set", "judges=[]"]  # fmt: skip


def _args(output: Path, num_images: int, steps: int) -> list[str]:
    return ["run", *RUN_ARGS, "--num-images", str(num_images), "--output", str(output),
            "--probe-param", f"standard_prompt.num_inference_steps={steps}"]


def _start_engine(output: Path, num_images: int, steps: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": "local"}
    return subprocess.Popen([sys.executable, "-m", "engine.cli", *_args(output, num_images, steps)], env=env,
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(condition, process: subprocess.Popen, what: str, seconds: float = 600) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert process.poll() is None, f"the run ended before {what}: {process.stdout.read()[-3000:]}"
        assert time.time() < deadline, f"no {what} after {seconds} s"
        time.sleep(0.2)


def _row_ids(output: Path) -> list[str]:
    return read_rows(output, columns=["row_id"]).column("row_id").to_pylist()


def test_a_live_holder_blocks_the_run_and_keeps_its_files(tmp_path, ray_session):
    output = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        _lock_file(output, pid=holder.pid, pid_started=process_start_time(holder.pid))
        live_temporary = output / ROWS_DIR / ".tmp-0123456789ab-live.parquet"
        live_temporary.parent.mkdir(parents=True)
        live_temporary.write_bytes(b"PAR1 a file still being written")
        refused = runner.invoke(app, _args(output, 2, 2))
        assert refused.exit_code == 2, refused.output
        lines = [line for line in refused.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), refused.output
        assert f"in use by `engine run` (pid {holder.pid} on {socket.gethostname()}" in lines[0]
        assert live_temporary.exists()  # nothing a live writer wrote is touched
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone: the next run takes the lock over and clears what it left.
    done = runner.invoke(app, _args(output, 2, 2))
    assert done.exit_code == 0, done.output
    assert not live_temporary.exists() and not (output / LOCK_FILE).exists()
    assert sorted(set(_row_ids(output))) == sorted(_row_ids(output)) and len(_row_ids(output)) == 2


@pytest.mark.slow
def test_two_runs_into_one_folder_one_runs_the_other_exits_2(tmp_path, ray_session):
    output = tmp_path / "out"
    first = _start_engine(output, num_images=4, steps=4)
    try:
        _wait_for(lambda: (output / LOCK_FILE).exists(), first, "the first run took the lock")
        second = runner.invoke(app, _args(output, 4, 4))
        assert second.exit_code == 2, second.output
        assert f"in use by `engine run` (pid {first.pid} on {socket.gethostname()}" in second.output
        log, _ = first.communicate(timeout=900)
    finally:
        first.kill()
    assert first.returncode == 0, log[-3000:]
    assert "4 rows generated, 0 already done" in log
    ids = _row_ids(output)
    assert len(ids) == 4 and len(set(ids)) == 4


@pytest.mark.slow
def test_sigterm_mid_run_exits_cleanly_and_releases_the_lock(tmp_path, ray_session):
    """SIGTERM (`timeout`, a scheduler cancelling the job) once the first file has landed: the driver
    exits with 128 + 15 through its `finally` blocks, so the lock is released and Ray shut down; the
    rerun does only the missing rows."""
    output = tmp_path / "out"
    run = _start_engine(output, num_images=8, steps=10)
    try:
        _wait_for(lambda: parquet_files(output), run, "the first results file")
        run.send_signal(signal.SIGTERM)
        log, _ = run.communicate(timeout=120)
    finally:
        run.kill()
    assert run.returncode == 128 + signal.SIGTERM, log[-3000:]
    assert not (output / LOCK_FILE).exists(), log[-3000:]
    assert "SIGTERM handler is not set" not in log
    kept = set(_row_ids(output))
    assert 0 < len(kept) < 8, "the run should have been stopped after some rows and before the last"

    rerun = runner.invoke(app, _args(output, 8, 10))
    assert rerun.exit_code == 0, rerun.output
    assert f"{8 - len(kept)} rows generated, {len(kept)} already done" in rerun.output
    ids = _row_ids(output)
    assert len(ids) == 8 and len(set(ids)) == 8 and kept <= set(ids)


@pytest.mark.slow
def test_driver_killed_mid_run_rerun_gives_every_row_once(tmp_path, ray_session):
    """SIGKILL of the driver once the first file has landed, while later units are in flight. A
    write cut off mid-file leaves only a hidden temporary (files are renamed into place when
    complete); one is planted here, since the kill cannot be timed to land inside a write."""
    output = tmp_path / "out"
    run = _start_engine(output, num_images=8, steps=10)
    try:
        _wait_for(lambda: parquet_files(output), run, "the first results file")
        run.send_signal(signal.SIGKILL)
        run.wait(timeout=60)
    finally:
        run.kill()
    kept = set(_row_ids(output))
    assert 0 < len(kept) < 8, "the run should have been killed after some rows and before the last"
    torn = output / ROWS_DIR / ".tmp-0123456789ab-torn.parquet"
    torn.write_bytes(b"PAR1 half a file")
    assert read_lock(output_location(output)).pid == run.pid  # the dead driver's lock is still there

    rerun = runner.invoke(app, _args(output, 8, 10))
    assert rerun.exit_code == 0, rerun.output
    assert f"{8 - len(kept)} rows generated, {len(kept)} already done" in rerun.output
    ids = _row_ids(output)
    assert len(ids) == 8 and len(set(ids)) == 8 and kept <= set(ids)
    assert not torn.exists() and not (output / LOCK_FILE).exists()
