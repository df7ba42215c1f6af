"""`engine export RUN --format hf DIR`: `datasets` opens the folder with an Image feature and typed
scores, the card lists the run's models, probes and counts, and bad input or a push that cannot
happen is one error line before any export."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from engine.cli import app

datasets = pytest.importorskip("datasets")
runner = CliRunner()


def test_datasets_loads_the_export_with_image_features(tiny_run, tmp_path):
    folder = tmp_path / "hf"
    result = runner.invoke(app, ["export", str(tiny_run), "--format", "hf", str(folder)])
    assert result.exit_code == 0, result.output
    rows = datasets.load_dataset("parquet", data_dir=str(folder), split="train", cache_dir=str(tmp_path / "cache"))
    assert len(rows) == 3
    assert isinstance(rows.features["image"], datasets.Image)
    assert rows.features["judge_target_prob"] == datasets.Value("float64")
    assert rows.features["judge_top1"] == datasets.Value("bool")
    assert rows.features["seed"] == datasets.Value("int64")
    picture = rows[0]["image"]
    assert picture.size == (64, 64)  # decoded to a PIL image
    assert sorted(rows["seed"]) == sorted([4534, 8752, 1233])


def test_the_card_lists_models_probes_and_counts(tiny_run, tmp_path):
    folder = tmp_path / "card"
    assert runner.invoke(app, ["export", str(tiny_run), "--format", "hf", str(folder)]).exit_code == 0
    text = (folder / "README.md").read_text(encoding="utf-8")
    header = yaml.safe_load(text.split("---\n")[1])
    facts = header["erasure_probe_engine"]
    assert facts["models"] == [{"name": "tiny", "method": "none"}]
    assert facts["concepts"] == ["church"] and facts["probes"] == ["standard_prompt"]
    manifest = json.loads((tiny_run / "manifest.json").read_text())
    assert facts["rows"] == 3 and facts["rows_by_role"] == {"base": 3}  # an un-erased model alone
    assert facts["engine_version"] == manifest["engine_version"] and facts["command"] == manifest["command_line"]
    assert len(facts["judges"]) == 2  # the tests' tiny CLIP and ImageNet judges (tests/conftest.py)
    assert header["configs"][0]["data_files"][0]["path"] == "data/*.parquet"
    assert header["size_categories"] == ["n<1K"]


@pytest.mark.parametrize("args, expected", [
    (["--format", "csv"], "--format csv: unknown format"),
    (["--push-to-hub", "no-owner"], "give a hub dataset id as OWNER/NAME"),
    (["--push-to-hub", "me/results"], "HF_HUB_OFFLINE is set"),
])  # fmt: skip
def test_bad_input_is_one_line_and_exports_nothing(tiny_run, tmp_path, monkeypatch, args, expected):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = runner.invoke(app, ["export", str(tiny_run), str(tmp_path / "out"), *args])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.output
    assert not (tmp_path / "out").exists()


def test_push_without_a_token_is_one_line(tiny_run, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no stored token
    monkeypatch.delenv("HF_TOKEN", raising=False)
    result = runner.invoke(app, ["export", str(tiny_run), str(tmp_path / "out"), "--push-to-hub", "me/results"])
    assert result.exit_code == 2 and "no Hugging Face token" in result.output, result.output


def test_an_export_never_writes_over_a_folder(tiny_run, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    result = runner.invoke(app, ["export", str(tiny_run), str(tmp_path / "full")])
    assert result.exit_code == 2 and "not an empty folder" in result.output
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
