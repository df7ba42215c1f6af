"""`engine demo`: its grid validates against the shipped toy world, and the --random variant runs."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from engine.cli import app
from engine.demo import demo_spec
from engine.pipeline.grid import expand_run
from engine.results import read_rows
from engine.specs.runs import run_spec_from_dict


def test_toy_demo_grid_plans_on_the_shipped_models(tmp_path):
    grid = expand_run(run_spec_from_dict(demo_spec(str(tmp_path), 2), "demo"))
    assert [m.name for m in grid.models] == ["toy-base", "toy-esdx-circle"]
    assert {p.name for p in grid.probes} == {"standard_prompt", "noise_based", "diffusion_completion", "inpainting"}
    # The erased model runs its own concept: 2 prompts x (1 + 6 noise candidates + 3 hand-overs + 1 inpainting);
    # the base model both concepts as the reference, under the probes with a base number (not completion).
    erased = [r for r in grid.rows if r.model == "toy-esdx-circle"]
    assert {r.concept for r in erased} == {"toy_circle"} and len(erased) == 2 * 11
    base = [r for r in grid.rows if r.model == "toy-base"]
    assert {r.role for r in base} == {"base"} and len(base) == 2 * 2 * (1 + 6 + 1)


@pytest.mark.slow
def test_random_demo_runs_and_reports(tmp_path, ray_session):
    result = CliRunner().invoke(app, ["demo", "--random", "--num-images", "1", "--output", str(tmp_path / "d")])
    assert result.exit_code == 0, result.output
    assert read_rows(tmp_path / "d").num_rows == 6
    assert (tmp_path / "d" / "report" / "report.html").exists()
    assert "standard_prompt" in result.output
