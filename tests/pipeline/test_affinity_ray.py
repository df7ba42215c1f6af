"""Model affinity through a real stream: four models on two probe actors (one thread each) load at
most M + 2 times in all, every row lands once, and the manifest records each actor's loads,
evictions and peak cache bytes."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from engine.cli import app
from engine.results import read_rows

runner = CliRunner()
MODELS = 4


@pytest.mark.slow
def test_two_actors_load_each_model_about_once(tmp_path, ray_session):
    from engine.models.builtin import build_tiny

    folders = []
    shared = build_tiny(seed=7)  # the components the models share (their UNets differ)
    for m in range(MODELS):
        own = build_tiny(seed=20 + m)
        folder = tmp_path / f"model-{m}"
        type(shared)(**{**shared.components, "unet": own.unet}).save_pretrained(folder, safe_serialization=True)
        folders.append(folder)
    output = tmp_path / "out"
    args = ["run", *[a for f in folders for a in ("--model", str(f))], "--concept", "church",
            "--probe", "standard_prompt", "--num-images", "8", "--output", str(output),
            "--probe-param", "standard_prompt.num_inference_steps=1",
            "--set", "batch_size=2", "--set", "actors=2", "--set", "torch_threads=1", "--set", "judges=[]"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = read_rows(output)
    assert rows.num_rows == MODELS * 8 and len(set(rows.column("row_id").to_pylist())) == MODELS * 8
    manifest = json.loads((output / "manifest.json").read_text())
    cache = manifest["model_cache"]
    assert len(cache["actors"]) == 2, cache
    assert cache["loads"] <= MODELS + 2, cache
    assert all(a["loads"] >= 1 and a["peak_bytes"] > 0 for a in cache["actors"])
    assert sum(cache["affinity"]["units_per_actor"].values()) == MODELS * 4
