"""End to end through the CLI on the session's local Ray: rows, schema, determinism, resume."""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from engine.cli import app
from engine.results import ROW_SCHEMA, decode_png, read_rows

runner = CliRunner()


@pytest.fixture
def first_run(tiny_run):
    """The session's tiny run (tests/conftest.py)."""
    return tiny_run


@pytest.fixture
def run_into(tiny_run_args):
    """The first run's command into another output folder."""

    def run(output):
        result = runner.invoke(app, ["run", *tiny_run_args, "--output", str(output)])
        assert result.exit_code == 0, result.output
        return result

    return run


def test_run_writes_exactly_the_requested_rows(first_run):
    table = read_rows(first_run)
    assert table.num_rows == 3
    assert set(ROW_SCHEMA.names) <= set(table.schema.names)
    rows = table.to_pylist()
    assert {r["model"] for r in rows} == {"tiny"} and {r["probe"] for r in rows} == {"standard_prompt"}
    assert sorted(r["seed"] for r in rows) == sorted([4534, 8752, 1233])
    assert len({r["row_id"] for r in rows}) == 3
    for row in rows:
        image = decode_png(row["image"])
        assert image.shape == (64, 64, 3)
        assert json.loads(row["params"])["num_inference_steps"] == 3
        assert row["target_concept"] == "church" and row["prompt"] == "a picture of a church"
        assert row["generation_seconds"] > 0


def test_manifest_records_config_versions_and_counts(first_run):
    manifest = json.loads((first_run / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["counts"]["planned"] == 3 and manifest["counts"]["rows_in_dataset"] == 3
    assert manifest["packages"]["torch"] and manifest["packages"]["ray"]
    assert manifest["config"]["run"]["num_images"] == 3
    assert manifest["config"]["probes"][0]["params"]["num_inference_steps"] == 3
    assert "git_commit" in manifest and manifest["started_at"] <= manifest["finished_at"]
    # batch_size auto on CPU: the fixed default, nothing measured.
    assert manifest["batching"] == {"batch_size": "auto", "unit_rows": 4, "measured": []}
    # The probe actor's model cache: one load of tiny, nothing evicted, its peak bytes under the budget.
    cache = manifest["model_cache"]
    assert cache["loads"] == 1 and cache["evictions"] == 0 and len(cache["actors"]) == 1
    (actor,) = cache["actors"]
    assert 0 < actor["peak_bytes"] <= actor["budget_bytes"] and actor["component_loads"] == 4


@pytest.mark.slow
def test_same_command_into_another_folder_gives_identical_images(first_run, run_into, tmp_path):
    run_into(tmp_path / "b")
    first = {r["row_id"]: r["image"] for r in read_rows(first_run).to_pylist()}
    second = {r["row_id"]: r["image"] for r in read_rows(tmp_path / "b").to_pylist()}
    assert first == second  # same ids, byte-identical PNGs


def test_rerun_resumes_without_duplicates(first_run, run_into, tmp_path):
    output = tmp_path / "resume"
    shutil.copytree(first_run, output)
    result = run_into(output)
    assert "0 rows generated, 3 already done" in result.output
    assert read_rows(output).num_rows == 3


@pytest.mark.slow
def test_killed_run_resumes_losing_nothing(first_run, run_into, tmp_path):
    """Simulate a run killed midway: one finished file survives, one is half-written."""
    output = tmp_path / "killed"
    shutil.copytree(first_run, output)  # the finished run, then cut back
    files = sorted((output / "rows").glob("*.parquet"))
    table = read_rows(output)
    for path in files:
        path.unlink()
    pq.write_table(table.slice(0, 1), output / "rows" / "survivor.parquet")
    (output / "rows" / "torn.parquet").write_bytes(b"PAR1 half a file")
    result = run_into(output)
    assert "2 rows generated, 1 already done" in result.output
    final = read_rows(output)
    assert final.num_rows == 3 and len(set(final.column("row_id").to_pylist())) == 3
    assert not (output / "rows" / "torn.parquet").exists()


def test_run_file_with_overrides(tmp_path):
    """`engine run FILE --set ...`: the overrides reach the grid the run executes (the run itself is
    the tiny run's above; here the grid, which `engine run` builds with the same two calls)."""
    from engine.pipeline.grid import expand_run
    from engine.pipeline.run_flags import RunFlags, run_spec_from_flags

    config = tmp_path / "grid.yaml"
    config.write_text(
        "output: unused\nmodels: [tiny, tiny-erased]\nconcepts: [church, van_gogh]\n"
        "probes:\n  - name: standard_prompt\n    params: {num_inference_steps: 2}\nnum_images: 5\n"
    )
    spec, _ = run_spec_from_flags(config, RunFlags(set_=["num_images=1", f"output={tmp_path / 'g'}"]))
    grid = expand_run(spec)
    rows = grid.rows
    assert spec.output == str(tmp_path / "g")
    assert sorted((r.model, r.concept) for r in rows) == [
        ("tiny", "church"), ("tiny", "van_gogh"), ("tiny-erased", "church"), ("tiny-erased", "van_gogh")]
    assert {m.method for m in grid.models if m.name == "tiny-erased"} == {"random-kv"}
    assert {json.loads(r.params)["num_inference_steps"] for r in rows} == {2}
