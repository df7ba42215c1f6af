"""`engine demo`: its grid validates against the shipped toy world, the --random variant plans on the
tiny models, and the demo runs and reports (the session's demo run, tests/conftest.py)."""

from __future__ import annotations

import pytest

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


def test_random_demo_grid_runs_the_tiny_models(tmp_path):
    """`engine demo --random`: the random tiny models, no toy-world weights, the tiny judges (plumbing only)."""
    grid = expand_run(run_spec_from_dict(demo_spec(str(tmp_path), 2, random_models=True), "demo"))
    assert [m.pretrained for m in grid.models] == ["tiny", "tiny-erased"]
    assert {p.name for p in grid.probes} == {"standard_prompt"}
    assert len(grid.rows) == 2 * 3 * 2  # two models x three concepts x two prompts
    assert grid.spec.judges == ["clip:tiny", "imagenet:tiny"]


@pytest.mark.slow
def test_the_demo_runs_and_reports(demo_run):
    """README's first command (one prompt a cell here): the rows, the summary and the report."""
    output, printed = demo_run
    rows = read_rows(output).to_pandas()
    assert len(rows) == 11 + 2 * 8  # the erased model's own concept, the base model's two concepts
    assert set(rows.model) == {"toy-base", "toy-esdx-circle"} and rows.judge_top1.notna().all()
    assert (output / "report" / "report.html").exists() and "report:" in printed
    assert "standard_prompt" in printed and "noise_based" in printed
