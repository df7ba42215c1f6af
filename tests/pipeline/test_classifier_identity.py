"""Rows made with a latent classifier name it by content: retraining into the same folder
regenerates them on resume; moving the same classifier to another folder does not."""

from __future__ import annotations

import shutil

import pytest

from engine.guidance.latent_classifier_io import write_untrained_classifiers
from engine.pipeline.grid import expand_run, pending_rows
from engine.specs.runs import RunSpec

SIZE = {"height": 32, "width": 32}
FAST = {"num_inference_steps": 2, **SIZE, "classifier_scales": [0.0, 30.0]}


def _grid(tmp_path, folder):
    return expand_run(RunSpec(
        output=str(tmp_path / "out"), models=["tiny"], concepts=["church"], num_images=2, judges=[],
        probes=["standard_prompt",
                {"name": "classifier_guidance", "params": {**FAST, "classifier_dir": str(folder)}},
                {"name": "noise_based", "params": {**SIZE, "num_inference_steps": 2, "eta_values": [1.0],
                                                   "variance_scales": [1.0], "selector": "latent_classifier"}}],
    ))  # fmt: skip


@pytest.mark.parametrize("seed", [3])
def test_retraining_a_classifier_into_the_same_folder_regenerates_its_rows(seed, tmp_path, tiny_pipe, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the latent_classifier selector reads ./classifiers
    folder = tmp_path / "classifiers"
    write_untrained_classifiers(folder, tiny_pipe, ["church"], seed=seed, **SIZE)
    first = _grid(tmp_path, folder)
    made_with = [r for r in first.rows if r.probe != "standard_prompt"]
    assert made_with and all(r.classifier_hash and r.classifier_hash.startswith("sha256:") for r in made_with)
    assert all(r.classifier_hash is None for r in first.rows if r.probe == "standard_prompt")
    assert all(str(folder) not in r.row_id for r in made_with)
    assert first.resolved_config()["classifier_hashes"] == {
        "classifier_guidance/church": made_with[0].classifier_hash,
        "noise_based/church": made_with[0].classifier_hash,
    }
    finished = {r.row_id for r in first.rows}
    assert pending_rows(_grid(tmp_path, folder).rows, finished) == []  # unchanged: resumes onto them

    # The same classifier in another folder: the same rows (identity names the content, not the path).
    moved = tmp_path / "elsewhere"
    shutil.copytree(folder, moved)
    moved_grid = _grid(tmp_path, moved)
    assert [r.row_id for r in moved_grid.rows if r.probe == "classifier_guidance"] == [
        r.row_id for r in first.rows if r.probe == "classifier_guidance"]

    # Retrained into the same folder: every row the classifier made is pending again, nothing else.
    write_untrained_classifiers(folder, tiny_pipe, ["church"], seed=seed + 1, **SIZE)
    pending = pending_rows(_grid(tmp_path, folder).rows, finished)
    assert sorted((r.probe, r.seed) for r in pending) == sorted((r.probe, r.seed) for r in made_with)
    assert {r.classifier_hash for r in pending} != {r.classifier_hash for r in made_with}
