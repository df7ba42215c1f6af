"""`engine plan` for `stop: on_hit`: the per-prompt counts by hand, the best / expected / worst images of a
small toy grid, the estimate from an earlier run's candidate_hits, and the flags' refusals."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from engine.cli import app
from engine.coverage_order import coverage_order
from engine.errors import UserError
from engine.pipeline.grid import expand_run
from engine.pipeline.stop_plan import expected_images, first_hit_position, images_until, plan_stop, stop_lines
from engine.results import ROWS_DIR, rows_table
from engine.specs.runs import RunSpec

runner = CliRunner()
SWEEP = {"num_inference_steps": 4, "eta_values": [1.0, 2.0], "variance_scales": [1.0, 1.04], "selector": "judge"}


def toy_grid(tmp_path, **params):
    spec = RunSpec(output=str(tmp_path / "out"), models=["toy-uce-circle"], concepts=["toy_circle"],
                   probes=[{"name": "noise_based", "params": {**SWEEP, **params}}], num_images=2, judges=["toy"])
    return expand_run(spec, strict=False)


def test_expected_images_per_prompt_by_hand():
    assert expected_images(4, 1, 0.5) == pytest.approx(1 + 0.5 + 0.25 + 0.125)
    # rounds of 2, 2 and 1 candidates, run after 0, 2 and 4 misses
    assert expected_images(5, 2, 0.5) == pytest.approx(2 + 2 * 0.25 + 1 * 0.0625)
    assert expected_images(24, 16, 0.0) == 24 and expected_images(24, 16, 1.0) == 16


def test_images_until_the_round_of_the_first_hit():
    assert images_until(24, 16, 3) == 16 and images_until(24, 16, 20) == 24 and images_until(24, 16, None) == 24
    assert images_until(4, 1, 2) == 3


def test_first_hit_position_reads_sweep_or_made_order():
    order = coverage_order((2, 2))  # [0, 2, 1, 3]
    assert first_hit_position([False, True, False, False], None, (2, 2)) == order.index(1)
    assert first_hit_position([False, False, True], [0, 2, 1], (2, 2)) == 2  # a stopped row: the order made
    assert first_hit_position([False] * 4, None, (2, 2)) is None


def test_a_toy_grid_best_worst_and_expected(tmp_path):
    grid = toy_grid(tmp_path, stop="on_hit", candidate_batch_size=1)
    estimate = plan_stop(grid, assume_recovery=0.5).probes["noise_based"]
    assert estimate.stops and estimate.exhaustive == 2 * 4 and estimate.best == 2 * 1
    assert estimate.expected == pytest.approx(2 * 1.875)
    assert estimate.tflop_per_image is None  # toy models are not costed in GPU-hours
    lines = stop_lines(plan_stop(grid, assume_recovery=0.5), 247.0, "h100")
    assert any("(1 - p)^(r b)" in line for line in lines)
    # Without stop, the section appears only when an expectation is asked for, as a what-if.
    plain = toy_grid(tmp_path)
    assert stop_lines(plan_stop(plain), 247.0, "h100") == []
    assert any("(if stop: on_hit)" in line for line in stop_lines(plan_stop(plain, 0.1), 247.0, "h100"))


def test_from_run_reads_each_cells_first_hits(tmp_path):
    grid = toy_grid(tmp_path, stop="on_hit", candidate_batch_size=2)
    row = grid.rows[0]
    # An earlier exhaustive run of the same cell: one prompt hit only at sweep index 3 (coverage position 3),
    # one at sweep index 2 (position 1), so with rounds of 2 they would make 4 and 2 images.
    earlier = tmp_path / "earlier"
    (earlier / ROWS_DIR).mkdir(parents=True)
    params = json.loads(row.params)
    params.pop("stop")
    records = [{"row_id": f"r{i}", "model": row.model, "method": row.method, "concept": row.concept,
                "target_concept": row.target_concept, "probe": "noise_based", "params": json.dumps(params),
                "prompt": row.prompt, "prompt_index": i, "seed": i, "extras": "{}", "candidate_hits": hits,
                "image": b"", "image_width": 32, "image_height": 32, "generation_seconds": 0.0, "device": "cpu",
                "engine_version": "test"}
               for i, hits in enumerate([[False, False, False, True], [False, False, True, False]])]
    pq.write_table(rows_table(records), earlier / ROWS_DIR / "part.parquet")
    estimate = plan_stop(grid, from_run=str(earlier)).probes["noise_based"]
    assert estimate.expected == pytest.approx(2 * (4 + 2) / 2)
    assert estimate.cells_missing == 0


def test_plan_flags_are_checked(tmp_path):
    config = tmp_path / "grid.yaml"
    config.write_text("output: unused\nmodels: [toy-uce-circle]\nconcepts: [toy_circle]\nnum_images: 2\n"
                      "judges: [toy]\nprobes: [{name: noise_based, params: {stop: on_hit, selector: judge}}]\n")
    result = runner.invoke(app, ["plan", str(config), "--assume-recovery", "0.2"])
    assert result.exit_code == 0, result.output
    assert "best-of-N with stop: on_hit" in result.output and "b_r (1 - p)^(r b)" in result.output
    assert runner.invoke(app, ["plan", str(config), "--assume-recovery", "1.5"]).exit_code == 2
    both = runner.invoke(app, ["plan", str(config), "--assume-recovery", "0.2", "--from-run", str(tmp_path)])
    assert both.exit_code == 2 and "not both" in both.output
    with pytest.raises(UserError, match="no best-of-N rows"):
        plan_stop(toy_grid(tmp_path), from_run=str(tmp_path))
