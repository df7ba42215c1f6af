"""A `stop: on_hit` run cut short and run again gives the rows an uninterrupted run gives: the coverage
order and each candidate's noise depend on the params and the seed alone, so a resumed row stops at the
same candidate and keeps the same image."""

from __future__ import annotations

import shutil

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from engine.cli import app
from engine.results import read_rows
from engine.toyworld.shipped import WEIGHTS_DIR

runner = CliRunner()
COMPARED = ["row_id", "image", "extras", "candidate_hits", "candidate_count", "selector", "judge_top1"]
RUN = """\
models: [toy-uce-circle]
concepts: [toy_circle]
probes:
  - {name: noise_based, params: {num_inference_steps: 10, guidance_scale: 5.0, eta_values: [1.0, 2.0],
                                 variance_scales: [1.0, 1.04], selector: judge, stop: on_hit,
                                 candidate_batch_size: 1}}
num_images: 8
batch_size: 3
judges: [toy]
"""


def _rows(output) -> dict[str, dict]:
    return {row["row_id"]: row for row in read_rows(output, COMPARED).to_pylist()}


@pytest.mark.slow
@pytest.mark.skipif(not (WEIGHTS_DIR / "toy-base" / "model_index.json").exists(), reason="toy-world weights not built")
def test_a_stopped_run_cut_short_and_resumed_gives_the_uninterrupted_rows(tmp_path, ray_session):
    config = tmp_path / "run.yaml"
    config.write_text(RUN)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    result = runner.invoke(app, ["run", str(config), "--set", f"output={whole}"])
    assert result.exit_code == 0, result.output
    shutil.copytree(whole, cut)
    expected = _rows(whole)
    assert any('"stopped_on_hit": true' in row["extras"] for row in expected.values())  # some prompt stopped
    # The run killed midway: a few rows published (a stopped one among them), one file torn.
    table = read_rows(cut)
    stopped = [i for i, extras in enumerate(table.column("extras").to_pylist()) if '"stopped_on_hit": true' in extras]
    for path in (cut / "rows").glob("*.parquet"):
        path.unlink()
    pq.write_table(table.take(sorted({0, 1, stopped[0]})), cut / "rows" / "survivor.parquet")
    (cut / "rows" / "torn.parquet").write_bytes(b"PAR1 half a file")
    result = runner.invoke(app, ["run", str(config), "--set", f"output={cut}"])
    assert result.exit_code == 0, result.output
    assert "already done" in result.output
    assert _rows(cut) == expected
