"""Bad input: exit code 2, one line naming the bad value and the choices, before Ray or models start."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

import engine.pipeline.run
from engine.cli import app

runner = CliRunner()


@pytest.fixture(autouse=True)
def no_execution(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("execution started despite bad input")

    monkeypatch.setattr(engine.pipeline.run, "execute", fail)


def _invoke(*args):
    return runner.invoke(app, ["run", *args])


BASE = ["--model", "tiny", "--concept", "church", "--probe", "standard_prompt", "--num-images", "1"]


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--model", "tiny", "--concept", "chruch", "--probe", "standard_prompt", "--num-images", "1"],
         "unknown concept 'chruch'; valid choices: "),
        (["--model", "tiny", "--concept", "church", "--probe", "standard", "--num-images", "1"],
         "unknown probe 'standard'; valid choices: "),
        (["--model", "tinyy", "--concept", "church", "--probe", "standard_prompt", "--num-images", "1"],
         "unknown model 'tinyy'"),
        (["--model", "./no/such/folder", "--concept", "church", "--probe", "standard_prompt", "--num-images", "1"],
         "model folder not found"),
        ([*BASE, "--unet", "/no/such/unet"], "UNet path not found"),
        ([*BASE, "--probe-param", "standard_prompt.num_inference_step=3"], "unknown key 'num_inference_step'"),
        ([*BASE, "--set", "batch_sise=3"], "unknown key 'batch_sise'"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, args, expected):
    result = _invoke(*args, "--output", str(tmp_path / "out"))
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert expected in lines[0]
    assert "Traceback" not in result.output


@pytest.mark.parametrize("count", ["0", "-3"])
def test_non_positive_image_count_is_rejected(tmp_path, count):
    result = _invoke("--model", "tiny", "--concept", "church", "--probe", "standard_prompt",
                     "--num-images", count, "--output", str(tmp_path))
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "num_images" in lines[0] and count in lines[0]


def test_malformed_and_misspelled_yaml(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("output: [unclosed\n")
    result = _invoke(str(broken))
    assert result.exit_code == 2 and "malformed YAML" in result.output
    misspelled = tmp_path / "misspelled.yaml"
    misspelled.write_text("output: o\nconcepts: [church]\nprobes: [standard_prompt]\nnum_images: 1\nmodel: [tiny]\n")
    result = _invoke(str(misspelled))
    assert result.exit_code == 2 and "unknown key 'model'" in result.output and "models" in result.output


def test_missing_run_file(tmp_path):
    result = _invoke(str(tmp_path / "nope.yaml"))
    assert result.exit_code == 2 and "config file not found" in result.output


def test_probes_list_and_describe():
    listed = runner.invoke(app, ["probes", "list"])
    assert listed.exit_code == 0 and "standard_prompt" in listed.output
    described = runner.invoke(app, ["probes", "describe", "standard_prompt"])
    assert described.exit_code == 0
    assert "num_inference_steps" in described.output and "7.5" in described.output
    unknown = runner.invoke(app, ["probes", "describe", "nope"])
    assert unknown.exit_code == 2 and "unknown probe 'nope'" in unknown.output
