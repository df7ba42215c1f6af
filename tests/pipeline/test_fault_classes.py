"""Faults mid-run (engine.pipeline.faults): each class diagnosed from the exceptions Ray really
raises, the state it leaves, the room check before work, and each fault injected into a real
`engine run` (subprocess, slow): one `error:` line, its exit code, and the same command afterwards
completes with every row exactly once.

How each fault is injected:
- disk full: the output on a 40 KB tmpfs (`mount -t tmpfs`), grown with `remount,size=` to resume;
- output unwritable: a read-only bind mount over the output once the run has started;
- object store gone: the moto S3 server stopped once the run has started, started again to resume
  (its buckets live in this process, so they survive);
- model missing: a model folder removed once the run has planned it, saved again to resume;
- worker lost: the rows sink's fault hook ENGINE_FAULT_INJECT=kill-writer (engine.pipeline.sink),
  which SIGKILLs every write task's worker until Ray's task retries run out.
Mounting needs root (tests run as root here); where it is refused the mount tests skip, saying so.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from engine.cli import app
from engine.lock import LOCK_FILE, OutputLock
from engine.pipeline.fault_exit import settle
from engine.pipeline.faults import (
    DISK_FULL,
    ENGINE_BUG,
    FAULT_CLASSES,
    MODEL_UNAVAILABLE,
    OBJECT_STORE,
    OUTPUT_UNWRITABLE,
    WORKER_LOST,
    diagnose,
    probe_output,
)
from engine.pipeline.grid import expand_run
from engine.pipeline.space import PNG_BYTES_PER_PIXEL, check_room, estimate_bytes, free_bytes
from engine.results import MANIFEST, read_manifest, read_rows, write_manifest
from engine.specs.runs import run_spec_from_dict
from engine.storage import output_location

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()
NUM_IMAGES = 4


# --------------------------------------------------------------------------- diagnosis (fast)


def _ray_wrapped(cause: BaseException):
    """The exception Ray hands the driver for a task that raised `cause` (RayTaskError(<type>))."""
    from ray.exceptions import RayTaskError

    remote_traceback = f"Traceback: ray::Write() in publish_rows\n{type(cause).__name__}: {cause}"
    return RayTaskError("Write", remote_traceback, cause).as_instanceof_cause()


def test_diagnoses_each_class_from_rays_wrapped_exceptions(tmp_path):
    from huggingface_hub.errors import LocalEntryNotFoundError
    from ray.exceptions import ActorDiedError, WorkerCrashedError

    local, s3 = output_location(tmp_path), output_location("memory://engine-test/faults")  # not local
    full = _ray_wrapped(OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left"))
    assert "No space left" in str(full)  # the wrapper repeats its cause's text, as Ray's do
    assert diagnose(full, local).fault is DISK_FULL
    root = diagnose(full, local).root
    assert isinstance(root, OSError) and "RayTaskError" not in type(root).__name__  # unwrapped
    pyarrow_style = OSError("[Errno 122] Disk quota exceeded")  # pyarrow sets no errno attribute
    assert diagnose(pyarrow_style, local).fault is DISK_FULL
    readonly = _ray_wrapped(OSError(errno.EROFS, "Read-only file system"))
    assert diagnose(readonly, local, output_probe=errno.EROFS).fault is OUTPUT_UNWRITABLE
    store = _ray_wrapped(OSError("When uploading part: AWS Error NETWORK_CONNECTION during UploadPart: curlCode: 7"))
    assert diagnose(store, s3).fault is OBJECT_STORE
    assert diagnose(RuntimeError("anything"), s3, output_probe=errno.EIO).fault is OBJECT_STORE
    hub = _ray_wrapped(LocalEntryNotFoundError("cannot find the requested files in the local cache"))
    assert diagnose(hub, local).fault is MODEL_UNAVAILABLE
    folder = _ray_wrapped(ValueError('The provided pretrained_model_name_or_path "/m" is neither a valid local path '
                                     "nor a valid repo id."))
    assert diagnose(folder, local).fault is MODEL_UNAVAILABLE
    gone = _ray_wrapped(FileNotFoundError(errno.ENOENT, "No such file or directory", "/models/esd/unet.safetensors"))
    assert diagnose(gone, local, model_sources=["/models/esd"]).fault is MODEL_UNAVAILABLE
    assert diagnose(gone, local).fault is ENGINE_BUG  # a missing file of no model and not of the output
    assert diagnose(WorkerCrashedError(), local).fault is WORKER_LOST
    assert diagnose(ActorDiedError(), local).fault is WORKER_LOST
    try:
        try:
            raise StopIteration  # what Ray Data was handling: context, not the cause
        except StopIteration:
            raise RuntimeError("wrapped") from KeyError("bug")
    except RuntimeError as bug:
        diagnosis = diagnose(bug, local)
    assert diagnosis.fault is ENGINE_BUG and isinstance(diagnosis.root, KeyError)


def test_a_user_error_raised_in_a_worker_is_found_behind_rays_wrappers():
    from engine.errors import UserError
    from engine.pipeline.faults import user_error_in

    assert user_error_in(_ray_wrapped(UserError("attention 'xformers' needs a CUDA device"))) == (
        "attention 'xformers' needs a CUDA device")
    as_text = RuntimeError("ray::MapWorker()\nengine.errors.UserError: device cuda requested but none\n")
    assert user_error_in(as_text) == "device cuda requested but none"
    assert user_error_in(OSError("disk")) is None


def test_exit_codes_are_distinct_and_documented():
    codes = [f.exit_code for f in FAULT_CLASSES]
    assert len(set(codes)) == len(codes) and not set(codes) & {0, 1, 2, 3, 143}
    readme = (ROOT / "README.md").read_text()
    for fault in FAULT_CLASSES:
        assert f"| {fault.exit_code} |" in readme, fault.key


def _grid(output: Path, num_images: int = NUM_IMAGES, model: str = "tiny"):
    return expand_run(run_spec_from_dict({
        "output": str(output), "models": [model], "concepts": ["church"], "probes": ["standard_prompt"],
        "num_images": num_images, "judges": [],
    }))


def test_an_engine_bug_leaves_a_log_a_failed_manifest_and_no_lock(tmp_path):
    output = tmp_path / "out"
    grid = _grid(output)
    with OutputLock(output_location(output), "engine run") as lock:
        write_manifest(output, {"status": "running", "counts": {"planned": NUM_IMAGES, "already_done": 0}})
        (output / "rows").mkdir()
        (output / "rows" / ".tmp-abc-x.parquet").write_bytes(b"half")
        try:
            raise RuntimeError("boom")
        except RuntimeError as error:
            fault = settle(error, grid, output_location(output), lock, 1.0)
    assert fault.fault is ENGINE_BUG and fault.exit_code == 15
    logs = list((output / "logs").glob("*.log"))
    assert len(logs) == 1 and "RuntimeError: boom" in logs[0].read_text()
    assert str(logs[0]) in fault.line and "0 of 4 rows saved" in fault.line
    manifest = read_manifest(output)
    assert manifest["status"] == "failed: engine-bug" and manifest["failed_at"] and manifest["counts"]["planned"] == 4
    assert not (output / LOCK_FILE).exists() and not list((output / "rows").iterdir())  # temporary removed


def test_probe_output_reports_the_errno(tmp_path):
    assert probe_output(output_location(tmp_path)) is None
    assert probe_output(output_location(tmp_path / "gone" / "deeper")) == errno.ENOENT


class _Unreachable:
    """An fsspec file system whose every call fails, as a stopped object store's do; counts the calls."""

    def __init__(self):
        self.calls: list[str] = []

    def __getattr__(self, name: str):
        def fail(*args, **kwargs):
            self.calls.append(name)
            raise OSError("AWS Error NETWORK_CONNECTION during ListObjectsV2 operation: curlCode: 7")

        return fail


def test_an_unreachable_store_is_probed_once_and_not_read_again(tmp_path):
    """Each call to a stopped object store fails only after the client's retries: after the probe's
    listing fails, the error line comes without reading rows or manifest (`rows saved: unknown`)."""
    import pyarrow.fs as pafs

    from engine.storage import OutputLocation

    uri = f"memory://engine-test/unreachable-{tmp_path.name}"
    grid = _grid(uri)
    probed, settled = _Unreachable(), _Unreachable()
    with OutputLock(output_location(uri), "engine run") as lock:
        root = output_location(uri).root
        assert probe_output(OutputLocation(pafs.PyFileSystem(pafs.FSSpecHandler(probed)), root, uri)) is not None
        gone = OutputLocation(pafs.PyFileSystem(pafs.FSSpecHandler(settled)), root, uri)
        fault = settle(_ray_wrapped(OSError("AWS Error NETWORK_CONNECTION during PutObject")), grid, gone, lock, 1.0)
    assert fault.fault is OBJECT_STORE and "rows saved: unknown" in fault.line
    assert settled.calls == probed.calls  # the probe's calls, nothing more


# --------------------------------------------------------------------------- room check (fast)


def test_output_size_estimate_uses_the_models_image_size(tmp_path):
    grid = _grid(tmp_path / "out")
    per_row = estimate_bytes(grid.rows, {m.name: m for m in grid.models}) / len(grid.rows)
    assert per_row == round(64 * 64 * PNG_BYTES_PER_PIXEL) + 2048  # tiny makes 64x64 images
    assert free_bytes(tmp_path / "not" / "yet") == free_bytes(tmp_path)  # the nearest existing folder
    store = "memory://engine-test/room"
    assert free_bytes(store) is None and check_room(_grid(store), grid.rows).fits


def test_plan_prints_the_estimated_output_size(paper_plan_output):
    line = next(line for line in paper_plan_output.splitlines() if line.startswith("estimated output size:"))
    assert "GB for 70,200 rows" in line
    assert "free space at runs/paper:" in paper_plan_output


def _can_mount(folder: Path) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40k", "tmpfs", str(folder)], capture_output=True)
    return done.returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """A 40 KB tmpfs at tmp_path/disk (unmounted afterwards)."""
    disk = tmp_path / "disk"
    if not _can_mount(disk):
        pytest.skip("cannot mount a tmpfs here (needs root): the disk-full tests need one")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_run_that_cannot_fit_is_refused_before_it_starts(small_disk):
    output = small_disk / "out"
    args = ["run", "--model", "tiny", "--concept", "church", "--probe", "standard_prompt", "--num-images", "6",
            "--output", str(output), "--set", "judges=[]"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert result.output.startswith("error: not enough space for") and "--no-space-check" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not output.exists()


# --------------------------------------------------------------------------- injected into engine run (slow)


def _command(output: str, model: str = "tiny", *extra: str) -> list[str]:
    return [sys.executable, "-m", "engine.cli", "run", "--model", model, "--concept", "church", "--probe",
            "standard_prompt", "--num-images", str(NUM_IMAGES), "--batch-size", "1", "--output", output,
            "--probe-param", "standard_prompt.num_inference_steps=2", "--set", "judges=[]", *extra]


def _env(**extra: str) -> dict[str, str]:
    # No progress lines: the terminal after the plan table is the fault's lines only.
    return {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": "local", "ENGINE_PROGRESS_SECONDS": "3600",
            **extra}


def _run(command: list[str], env: dict[str, str], when_started: Callable[[], bool] | None = None,
         then: Callable[[], None] | None = None) -> subprocess.CompletedProcess:
    """Run `command`; once `when_started()` holds (polled), call `then()` (the fault) while it runs."""
    process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if when_started is not None:
        deadline = time.monotonic() + 600
        while not when_started():
            assert process.poll() is None, f"the run ended before the fault: {process.communicate()}"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        then()
    stdout, stderr = process.communicate(timeout=900)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def _assert_one_error_line(result: subprocess.CompletedProcess, code: int) -> str:
    assert result.returncode == code, result.stdout + result.stderr
    out_lines = result.stdout.splitlines()
    # After the plan table (its header, then lines indented by two spaces): the fault's lines only.
    after_table = [line for line in out_lines[1:] if not line.startswith("  ")] + result.stderr.splitlines()
    after_table = [line for line in after_table if line.strip()]
    assert len(after_table) <= 5, after_table
    errors = [line for line in after_table if line.startswith("error: ")]
    assert len(errors) == 1, after_table
    assert "Traceback" not in result.stdout + result.stderr and "ray-project" not in result.stderr
    return errors[0]


def _resume(command: list[str]) -> subprocess.CompletedProcess:
    """The same `engine run` again, to resume: in this process, on the session's Ray (the fault was
    seen in a process of its own; a resume needs no Ray of its own, which saves starting one)."""
    result = runner.invoke(app, command[3:])  # [python, -m, engine.cli, run, ...]
    return subprocess.CompletedProcess(command, result.exit_code, result.output, "")


def _assert_complete_once(output: str, result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout + result.stderr
    ids = read_rows(output, columns=["row_id"]).column("row_id").to_pylist()
    assert len(ids) == NUM_IMAGES and len(set(ids)) == NUM_IMAGES
    assert read_manifest(output)["status"] == "complete"


@pytest.mark.slow
def test_disk_full_mid_run(small_disk, ray_session):
    output = str(small_disk / "out")
    command = _command(output, "tiny", "--no-space-check")
    line = _assert_one_error_line(_run(command, _env()), DISK_FULL.exit_code)
    assert line.startswith(f"error: no space left on device writing {output}/rows (")
    assert "rows saved; free space and run the same command to resume)" in line
    assert read_manifest(output)["status"] == "failed: disk-full"
    assert not (Path(output) / LOCK_FILE).exists()
    assert not [p for p in (Path(output) / "rows").iterdir() if p.name.startswith(".tmp-")]
    subprocess.run(["mount", "-o", "remount,size=8m", str(small_disk)], check=True)  # space freed
    _assert_complete_once(output, _resume(command))


@pytest.mark.slow
def test_output_turned_read_only_mid_run(tmp_path, ray_session):
    output = tmp_path / "out"
    output.mkdir()
    command = _command(str(output))

    def read_only() -> None:
        subprocess.run(["mount", "--bind", str(output), str(output)], check=True)
        subprocess.run(["mount", "-o", "remount,ro,bind", str(output)], check=True)

    if subprocess.run(["mount", "--bind", str(output), str(output)], capture_output=True).returncode != 0:
        pytest.skip("cannot bind-mount here (needs root): the read-only output test needs it")
    subprocess.run(["umount", str(output)], check=True)
    try:
        result = _run(command, _env(), lambda: (output / MANIFEST).exists(), read_only)
    finally:
        subprocess.run(["umount", "-l", str(output)], check=False)
    line = _assert_one_error_line(result, OUTPUT_UNWRITABLE.exit_code)
    assert line.startswith(f"error: the output is read-only writing {output}") and "make it writable again" in line
    assert (output / LOCK_FILE).exists()  # left for the next run's takeover: it could not be removed
    _assert_complete_once(str(output), _resume(command))


@pytest.mark.slow
def test_model_folder_removed_after_planning(tmp_path, tiny_pipe, ray_session):
    import shutil

    model, output = tmp_path / "model", tmp_path / "out"
    tiny_pipe.save_pretrained(model)
    command = _command(str(output), str(model))
    result = _run(command, _env(), lambda: (output / MANIFEST).exists(), lambda: shutil.rmtree(model))
    line = _assert_one_error_line(result, MODEL_UNAVAILABLE.exit_code)
    assert line.startswith(f"error: a model could not be loaded: model model ({model})")
    assert read_manifest(output)["status"] == "failed: model-unavailable"
    tiny_pipe.save_pretrained(model)  # the model is back
    _assert_complete_once(str(output), _resume(command))


@pytest.mark.slow
def test_worker_killed_beyond_its_retries(tmp_path, ray_session):
    output = str(tmp_path / "out")
    command = _command(output)
    line = _assert_one_error_line(_run(command, _env(ENGINE_FAULT_INJECT="kill-writer")), WORKER_LOST.exit_code)
    assert "run the same command to resume" in line
    assert read_manifest(output)["status"] == "failed: worker-lost"
    _assert_complete_once(output, _resume(command))


@pytest.mark.slow
def test_object_store_stopped_mid_run():
    moto_server = pytest.importorskip("moto.server", reason="moto[server] is in the test extra")
    import boto3

    from tests.storage.test_storage import AWS_ENV, _free_port

    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = _env(**AWS_ENV, AWS_ENDPOINT_URL_S3=endpoint)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    client = boto3.client("s3", endpoint_url=endpoint, **{k.lower(): v for k, v in AWS_ENV.items()
                                                          if k != "AWS_DEFAULT_REGION"}, region_name="us-east-1")
    client.create_bucket(Bucket="engine")
    output = "s3://engine/faulty"
    command = _command(output)

    def manifest_written() -> bool:
        return client.list_objects_v2(Bucket="engine", Prefix="faulty/manifest.json").get("KeyCount", 0) > 0

    try:
        result = _run(command, env, manifest_written, server.stop)
        line = _assert_one_error_line(result, OBJECT_STORE.exit_code)
        assert line.startswith(f"error: the object store cannot be reached writing {output}")
        # moto keeps its buckets in this process: a new server on the port serves the same objects.
        server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        resumed = _run(command, env)  # its own process: the session's Ray workers lack the S3 variables
        saved = {k: os.environ.get(k) for k in [*AWS_ENV, "AWS_ENDPOINT_URL_S3"]}
        os.environ.update(AWS_ENV, AWS_ENDPOINT_URL_S3=endpoint)
        try:
            _assert_complete_once(output, resumed)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
    finally:
        server.stop()



def test_raylet_retry_lines_leave_stdout_only_without_verbose(capsys):
    import logging

    from engine.pipeline.raynoise import quiet_retry_lines

    died = "\x1b[33m(raylet)\x1b[0m A worker died or was killed while executing a task by an unexpected system error.\n"
    root = logging.getLogger()
    level = root.level
    try:
        for verbose in (False, True):
            root.setLevel(logging.INFO if verbose else logging.WARNING)
            with quiet_retry_lines():
                print(died.rstrip("\n"), file=sys.stdout)  # as Ray writes it: the text, then a newline
                sys.stdout.write("a line of the engine\n")
            out = capsys.readouterr().out
            assert out == (died if verbose else "") + "a line of the engine\n"  # no blank line left behind
    finally:
        root.setLevel(level)
