"""Faults: a CUDA out-of-memory error splits its unit down to one row; a row that fails on its own
(exception, NaN, all-black image) goes to failures.parquet, the run exits 3 and the same command
retries exactly those rows. Also the run's log (counts), progress lines, Ray's noise filtered,
provenance in the manifest and `engine --version`."""

from __future__ import annotations

import json
import logging
import os
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from pydantic import Field
from typer.testing import CliRunner

from engine import __version__
from engine.cli import app
from engine.errors import UserError
from engine.failures import FAILURES_FILE, RowFailure, merge_failures, read_failures, write_failures
from engine.pipeline.grid import expand_run, work_units
from engine.pipeline.progress import Progress, progress_seconds
from engine.pipeline.provenance import command_line, model_source
from engine.pipeline.raynoise import filter_ray_loggers, filtered_stderr
from engine.pipeline.runlog import ActorInfo, RunLog, UnitReport
from engine.pipeline.stages import ProbeRunner, ProbeStageConfig, image_problem, is_out_of_memory
from engine.probe import PROBE_REGISTRY, Probe, ProbeBatch, ProbeOutput, ProbeParams, WorkRow
from engine.results import read_rows
from engine.specs.concepts import load_concept
from engine.specs.runs import ModelSpec, run_spec_from_dict

runner = CliRunner()
SEEDS = [seed for _, _, seed in load_concept("church").sample_prompts(8)]


class FaultyParams(ProbeParams):
    oom_above: int | None = Field(None, description="Raise a CUDA OOM for units of more rows than this.")
    fail_seeds: list[int] = Field(default_factory=list, description="Rows whose generation raises.")
    black_seeds: list[int] = Field(default_factory=list, description="Rows that come out all black.")
    user_error: bool = Field(False, description="Raise a UserError (a mistake of the user's: stops the run).")
    armed: str | None = Field(None, description="Row faults only while this file exists (a fixed rerun).")


class FaultyProbe(Probe):
    """Seeded noise images, no diffusion, with faults injected on demand."""

    name = "faulty"
    params_class = FaultyParams
    sampler = "pipeline"
    role = "recovery"
    needs_base_reference = False
    best_of_n = False
    base_reference = False
    baseline = False

    def run(self, batch: ProbeBatch) -> ProbeOutput:
        params = batch.params
        if params.user_error:
            raise UserError("injected user error")
        if params.oom_above is not None and len(batch.rows) > params.oom_above:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {len(batch.rows)} rows")
        armed = params.armed is None or Path(params.armed).exists()
        images = []
        for row in batch.rows:
            if armed and row.seed in params.fail_seeds:
                raise ValueError(f"injected failure of seed {row.seed}")
            image = np.random.RandomState(row.seed).randint(1, 256, (16, 16, 3)).astype(np.uint8)
            images.append(image * 0 if armed and row.seed in params.black_seeds else image)
        return ProbeOutput(images=images)


@pytest.fixture
def faulty(monkeypatch):
    monkeypatch.setitem(PROBE_REGISTRY, "faulty", f"{__name__}:FaultyProbe")


def _plan(tmp_path, num_images=8, **params):
    spec = run_spec_from_dict({
        "output": str(tmp_path / "out"), "models": ["tiny"], "concepts": ["church"], "num_images": num_images,
        "probes": [{"name": "faulty", "params": params}], "judges": [], "batch_size": num_images,
    })  # fmt: skip
    return expand_run(spec)


def _generate(grid, tmp_path):
    config = ProbeStageConfig.from_grid(grid, "cpu", "sdpa", 1, str(tmp_path / "cache"))
    (unit,) = work_units(grid.rows, grid.spec.batch_size)
    return ProbeRunner(config).generate(unit)


# --------------------------------------------------------------------------- in-process: ProbeRunner.generate


def test_oom_unit_of_8_completes_through_splits(faulty, tmp_path):
    outcome = _generate(_plan(tmp_path, oom_above=2), tmp_path)
    assert [r["seed"] for r in outcome.records] == SEEDS  # every row, in unit order
    assert outcome.oom_splits == 3 and outcome.isolation_splits == 0 and outcome.failures == []  # 8 -> 4+4 -> 2+2+2+2


def test_oom_on_a_single_row_is_that_rows_failure(faulty, tmp_path):
    outcome = _generate(_plan(tmp_path, num_images=2, oom_above=0), tmp_path)
    assert outcome.records == [] and outcome.oom_splits == 1
    assert [f.error_type for f in outcome.failures] == ["OutOfMemoryError"] * 2
    assert "CUDA out of memory" in outcome.failures[0].message


def test_failing_and_black_rows_are_isolated(faulty, tmp_path):
    outcome = _generate(_plan(tmp_path, fail_seeds=[SEEDS[1]], black_seeds=[SEEDS[5]]), tmp_path)
    assert [r["seed"] for r in outcome.records] == [s for s in SEEDS if s not in (SEEDS[1], SEEDS[5])]
    failed = {f.row.seed: f for f in outcome.failures}
    assert failed.keys() == {SEEDS[1], SEEDS[5]}
    assert failed[SEEDS[1]].error_type == "ValueError" and "injected failure" in failed[SEEDS[1]].message
    assert failed[SEEDS[5]].error_type == "BadImage" and "all-black" in failed[SEEDS[5]].message
    assert outcome.isolation_splits == 3 and outcome.oom_splits == 0  # 8 -> 4 -> 2 -> 1


def test_user_error_stops_the_unit(faulty, tmp_path):
    with pytest.raises(UserError, match="injected user error"):
        _generate(_plan(tmp_path, num_images=2, user_error=True), tmp_path)


@pytest.mark.parametrize("error, expected", [
    (torch.cuda.OutOfMemoryError("CUDA out of memory."), True),
    (RuntimeError("CUDA error: out of memory"), True),
    (RuntimeError("shape mismatch"), False),
])  # fmt: skip
def test_is_out_of_memory(error, expected):
    assert is_out_of_memory(error) is expected


def test_image_problem():
    assert image_problem(np.full((4, 4, 3), 7, np.uint8)) is None
    assert "all-black" in image_problem(np.zeros((4, 4, 3), np.uint8))
    assert "NaN" in image_problem(np.full((4, 4, 3), np.nan, np.float32))


def test_nan_images_become_black_and_so_fail():
    from engine.probe import to_uint8

    (image,) = to_uint8(np.full((1, 4, 4, 3), np.nan, np.float32))
    assert "all-black" in image_problem(image)


# --------------------------------------------------------------------------- failures.parquet and the log


def _row(n: int) -> WorkRow:
    pairing = {"role": "recovery", "erased": ("church",)} if n == 1 else {}
    return WorkRow(f"id{n}", "tiny", "none", "church", "church", "faulty", "{}", "a church", n, 100 + n, **pairing)


def _failure(n: int, second: int = 0) -> RowFailure:
    return RowFailure(_row(n), "ValueError", f"boom {n}", datetime(2026, 1, 1, 0, 0, second, tzinfo=UTC))


def test_failures_file_round_trips_and_vanishes_when_empty(tmp_path):
    write_failures(tmp_path, [_failure(1), _failure(2)])
    assert read_failures(tmp_path) == [_failure(1), _failure(2)]
    write_failures(tmp_path, [])
    assert not (tmp_path / FAILURES_FILE).exists() and read_failures(tmp_path) == []


def test_merge_keeps_the_truth():
    previous = [_failure(1), _failure(2), _failure(3)]
    # Row 1 retried and failed again, row 2 retried and done, row 3 not attempted (another grid).
    merged = merge_failures(previous, [_failure(1, second=9)], attempted={"id1", "id2"}, finished={"id2"})
    assert sorted((f.row.row_id, f.failed_at.second) for f in merged) == [("id1", 9), ("id3", 0)]
    assert merge_failures(previous, [], attempted=set(), finished={"id1", "id2", "id3"}) == []


def test_run_log_counts_rows_once_and_restarts_and_retries():
    log = RunLog()
    for pid in (1, 2, 3):  # a pool of 2 whose actor restarted once
        log.actor_started(ActorInfo("probe", "host", pid, "cuda:0", "NVIDIA H200"))
    log.actor_started(ActorInfo("score", "host", 4, "cpu", None))
    log.unit_started("a")
    log.unit_finished(UnitReport("a", ["id0"], [RowFailure.of(_row(1), "ValueError", "x")], oom_splits=1))
    log.unit_started("a")  # Ray ran the unit again after losing the actor: this time row 1 worked
    log.unit_finished(UnitReport("a", ["id0", "id1"], [], isolation_splits=2))
    assert log.progress() == (2, 0)
    events = log.snapshot()
    assert events.failed_rows() == [] and events.gpus() == ["NVIDIA H200"]
    assert events.fault_counts({"probe": 2, "score": 1}) == {
        "failed_rows": 0, "oom_splits": 1, "isolation_splits": 2, "unit_retries": 1, "actor_restarts": 1}


# --------------------------------------------------------------------------- progress, noise, provenance


def test_progress_line_has_done_total_rate_and_eta(monkeypatch):
    now = [0.0]
    lines = []

    class Stream:
        def write(self, text):
            lines.append(text)

        def flush(self):
            pass

    progress = Progress(100, "rows", "progress", "images/s", live=False, stream=Stream(), interval=30,
                        clock=lambda: now[0])
    now[0] = 10.0
    progress.update(20)  # before the interval: no line
    assert lines == []
    now[0] = 40.0
    progress.update(40, "1 failed")
    assert lines[0] == "progress: 40/100 rows (40%), 1.00 images/s, ETA 0:01:00, 1 failed"
    progress.close()  # a log that showed progress shows where it ended
    assert lines[-2].startswith("progress: 40/100 rows")


@pytest.mark.parametrize("value", ["0", "-1", "soon", "inf"])
def test_bad_progress_interval_is_a_user_error(monkeypatch, value):
    monkeypatch.setenv("ENGINE_PROGRESS_SECONDS", value)
    with pytest.raises(UserError, match="ENGINE_PROGRESS_SECONDS must be a positive number"):
        progress_seconds()


def test_ray_noise_is_filtered_from_stderr(capfd):
    with filtered_stderr():  # Ray's C++ core worker writes straight to file descriptor 2
        os.write(2, b"[2026 E 1 1] core_worker.cc:2465: Actor with class name: 'MapWorker(X)' and ID: 'ab' has "
                    b"constructor arguments in the object store and max_restarts > 0. If the arguments ...\n")
        os.write(2, b"a real error\n")
        os.write(2, b"\rprogress bar redrawn in place")
    assert capfd.readouterr().err == "a real error\n\rprogress bar redrawn in place"


def test_ray_noise_is_filtered_from_ray_loggers():
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    source = logging.getLogger("ray.data._internal.progress")
    source.addHandler(handler)
    try:
        filter_ray_loggers()
        source.warning("Progress bars disabled. To enable, set `ray.data.DataContext...`")
        source.warning("something that matters")
    finally:
        source.removeHandler(handler)
    assert [r.getMessage() for r in records] == ["something that matters"]


def test_command_line():
    assert command_line(["/x/engine/cli/__main__.py", "run", "--output", "a b"]) == \
        "python -m engine.cli run --output 'a b'"
    assert command_line(["/venv/bin/engine", "run"]) == "engine run"


def test_model_source_names_the_hub_commit_or_why_not(tmp_path, monkeypatch):
    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--erased"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "model_index.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    hub = model_source(ModelSpec(name="e", pretrained="org/erased"))
    assert hub["commit"] == commit and hub["reason"] is None
    missing = model_source(ModelSpec(name="m", pretrained="org/missing"))
    assert missing["commit"] is None and "hub cache" in missing["reason"]
    builtin = model_source(ModelSpec(name="tiny", pretrained="tiny"))
    assert builtin["commit"] is None and "built-in" in builtin["reason"]
    local = model_source(ModelSpec(name="l", pretrained=str(tmp_path), unet=str(tmp_path / "u.safetensors")))
    assert local["commit"] is None and "local folder" in local["reason"] and local["unet"]["reason"]


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"engine {__version__}"


# --------------------------------------------------------------------------- through Ray and the CLI


def _run_args(output: Path, armed: Path) -> list[str]:
    params = {"oom_above": 2, "fail_seeds": [SEEDS[1]], "black_seeds": [SEEDS[5]], "armed": str(armed)}
    return ["run", "--model", "tiny", "--concept", "church", "--probe", "faulty", "--num-images", "8",
            "--batch-size", "8", "--output", str(output), "--set", "judges=[]",
            *[arg for key, value in params.items() for arg in ("--probe-param", f"faulty.{key}={json.dumps(value)}")]]


@pytest.fixture(scope="module")
def faulty_run(tmp_path_factory, ray_session):
    """One run of 8 rows in one unit on the session's Ray: OOM above 2 rows, one row raising, one
    black. Progress lines every 0.2 s (the output is not a terminal)."""
    folder = tmp_path_factory.mktemp("faults")
    armed = folder / "armed"
    armed.touch()
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(PROBE_REGISTRY, "faulty", f"{__name__}:FaultyProbe")
        patch.setenv("ENGINE_PROGRESS_SECONDS", "0.2")
        result = runner.invoke(app, _run_args(folder / "out", armed))
    return folder / "out", armed, result


def test_failed_rows_exit_3_and_land_in_failures_only(faulty_run):
    output, _, result = faulty_run
    assert result.exit_code == 3, result.output
    failures = pq.read_table(output / FAILURES_FILE).to_pylist()
    assert sorted((f["seed"], f["error_type"]) for f in failures) == sorted(
        [(SEEDS[1], "ValueError"), (SEEDS[5], "BadImage")]), failures[0]["message"]
    assert "2 rows failed; run the same command again to retry them" in result.output
    rows = read_rows(output).to_pylist()
    assert sorted(r["seed"] for r in rows) == sorted(s for s in SEEDS if s not in (SEEDS[1], SEEDS[5]))
    assert not {f["row_id"] for f in failures} & {r["row_id"] for r in rows}
    assert all(f["message"] and f["failed_at"] and f["probe"] == "faulty" for f in failures)


def test_manifest_counts_faults_and_records_provenance(faulty_run):
    output, _, _ = faulty_run
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["status"] == "incomplete"
    assert manifest["counts"]["failed"] == 2 and manifest["counts"]["rows_in_dataset"] == 6
    faults = manifest["faults"]
    assert faults["oom_splits"] == 3 and faults["failed_rows"] == 2 and faults["isolation_splits"] == 1
    assert faults["unit_retries"] == 0 and faults["actor_restarts"] == 0
    provenance = manifest["provenance"]
    assert provenance["models"]["tiny"]["commit"] is None and "built-in" in provenance["models"]["tiny"]["reason"]
    assert provenance["gpus"] == [] and [a["stage"] for a in provenance["actors"]] == ["probe"]
    assert manifest["command_line"] == command_line()  # this process's command (pytest's, under CliRunner)


def test_progress_lines_in_a_non_terminal_run(faulty_run):
    lines = [line for line in faulty_run[2].output.splitlines() if line.startswith("progress: ")]
    assert lines and lines[-1].startswith("progress: 8/8 rows (100%)") and lines[-1].endswith("2 failed")
    assert "Progress bars disabled" not in faulty_run[2].output


def test_rerun_retries_only_the_failed_rows(faulty_run, faulty):
    output, armed, _ = faulty_run
    armed.unlink()  # the cause is fixed
    result = runner.invoke(app, _run_args(output, armed))
    assert result.exit_code == 0, result.output
    assert "2 rows generated, 6 already done" in result.output
    rows = read_rows(output).column("seed").to_pylist()
    assert sorted(rows) == sorted(SEEDS)
    assert not (output / FAILURES_FILE).exists()
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["faults"]["failed_rows"] == 0
    assert [h["failed"] for h in manifest["history"]] == [2, 0]


def test_dashboard_url_is_printed_when_the_cluster_has_one(monkeypatch, capsys):
    from types import SimpleNamespace

    import ray

    import engine.pipeline.ray_start
    from engine.pipeline.run import ray_session

    calls = []
    monkeypatch.setattr(engine.pipeline.ray_start, "report_node_engines", lambda ray, shipped: [])
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs) or SimpleNamespace(dashboard_url=url))
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    url = "10.0.0.1:8265"
    with ray_session("auto", ship_code=False):
        pass
    url = None  # a local Ray without a dashboard: nothing printed
    with ray_session(None):
        pass
    assert capsys.readouterr().err == "Ray dashboard: http://10.0.0.1:8265\n"
    assert [c["address"] for c in calls] == ["auto", "local"]
