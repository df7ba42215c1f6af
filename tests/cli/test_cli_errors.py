"""Bad input: exit code 2, one line naming the bad value and the choices, before Ray or models start."""

from __future__ import annotations

import os

import pytest
from typer.testing import CliRunner

import classifier_training.jobs
import engine.pipeline.run
import engine.report.build
import engine.tune.execute
from engine.cli import app

runner = CliRunner()


@pytest.fixture(autouse=True)
def no_execution(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("execution started despite bad input")

    monkeypatch.setattr(engine.pipeline.run, "execute", fail)
    monkeypatch.setattr(engine.tune.execute, "execute_tune", fail)
    monkeypatch.setattr(engine.report.build, "build_report", fail)
    monkeypatch.setattr(classifier_training.jobs, "train_classifiers", fail)


def _one_error_line(result) -> str:
    """The single `error: ...` line of a rejected command (exit 2, no traceback)."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


def _invoke(*args):
    return runner.invoke(app, ["run", *args])


BASE = ["--model", "tiny", "--concept", "church", "--probe", "standard_prompt", "--num-images", "1"]


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--model", "tiny", "--concept", "chruch", "--probe", "standard_prompt", "--num-images", "1"],
         "unknown concept 'chruch' (did you mean 'church'?); valid choices: "),
        (["--model", "tiny", "--concept", "church", "--probe", "standard", "--num-images", "1"],
         "unknown probe 'standard'"),
        (["--model", "tinyy", "--concept", "church", "--probe", "standard_prompt", "--num-images", "1"],
         "unknown model 'tinyy' (did you mean 'tiny'?)"),
        (["--model", "./no/such/folder", "--concept", "church", "--probe", "standard_prompt", "--num-images", "1"],
         "model folder not found"),
        ([*BASE, "--unet", "/no/such/unet"], "UNet path not found"),
        ([*BASE, "--probe-param", "standard_prompt.num_inference_step=3"],
         "unknown key 'num_inference_step' (did you mean 'num_inference_steps'?)"),
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


# --------------------------------------------------------------------------- issue 15: the four cases


TUNE_BASE = ["--model", "tiny", "--concept", "church", "--num-images", "1"]


@pytest.mark.parametrize(
    "command",
    [
        ["run", *BASE, "--output", "{file}"],
        ["tune", "--probe", "noise_based", *TUNE_BASE, "--output", "{file}"],
        ["demo", "--output", "{file}"],
        ["train-classifier", "church", "--output-dir", "{file}"],
        ["report", "{tmp}", "--output", "{file}"],
    ],
    ids=["run", "tune", "demo", "train-classifier", "report"],
)
def test_output_that_is_a_file_is_one_line(tmp_path, command):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    args = [part.format(file=afile, tmp=tmp_path) for part in command]
    line = _one_error_line(runner.invoke(app, args))
    flag = "--output-dir" if command[0] == "train-classifier" else "--output"
    assert line == f"error: {flag}: {afile} exists and is not a folder; give a folder path"
    below = [part.format(file=afile / "sub", tmp=tmp_path) for part in command]
    line = _one_error_line(runner.invoke(app, below))
    assert f"cannot create {afile / 'sub'}: {afile} is a file, not a folder" in line
    assert afile.read_text() == "not a folder"


def test_output_from_a_run_file_names_the_file_line(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    run_file = tmp_path / "run.yaml"
    run_file.write_text(f"models: [tiny]\nconcepts: [church]\nprobes: [standard_prompt]\nnum_images: 1\n"
                        f"output: {afile}\n")
    line = _one_error_line(_invoke(str(run_file)))
    assert line.startswith(f"error: {run_file}:5: {afile} exists and is not a folder")


def test_output_that_is_not_writable_is_one_line(tmp_path, monkeypatch):
    # Tests may run as root, for whom every folder is writable: ask os.access as a normal user would get it.
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if str(path) == str(locked) and mode & os.W_OK
                        else real_access(path, mode, **kw))
    line = _one_error_line(_invoke(*BASE, "--output", str(locked)))
    assert line == f"error: --output: {locked} is not writable"
    line = _one_error_line(_invoke(*BASE, "--output", str(locked / "new" / "run")))
    assert line == f"error: --output: {locked / 'new' / 'run'} is not writable ({locked} does not let us create it)"


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--probe-param", "noise_based.eta_values=[nan]"],
         "--probe-param noise_based.eta_values=[nan]: probe noise_based params: eta_values.0: "
         "Input should be a finite number (got 'nan')"),
        (["--probe-param", "noise_based.eta_values=[1.0, .inf]"], "eta_values.1: Input should be a finite number"),
        (["--probe-param", "noise_based.variance_scales=[-.inf]"], "variance_scales.0: Input should be a finite"),
        (["--probe-param", "noise_based.guidance_scale=.inf"], "guidance_scale: Input should be a finite number"),
        (["--probe-param", "noise_based.guidance_scale=-inf"], "guidance_scale: Input should be a finite number"),
        (["--set", "gpus_per_actor=.nan"],
         "--set gpus_per_actor=.nan: gpus_per_actor: Input should be a finite number, or 'auto' (got nan)"),
        (["--set", "score_gpus=inf"], "score_gpus: Input should be a finite number, or 'auto'"),
        (["--set", "probes=[{name: noise_based, params: {eta_values: [.nan]}}]"],
         "--set probes=[{name: noise_based, params: {eta_values: [.nan]}}]: probe noise_based params: eta_values.0"),
    ],
)
def test_nan_and_infinity_are_rejected_naming_the_parameter(tmp_path, args, expected):
    base = ["--model", "tiny", "--concept", "church", "--probe", "noise_based", "--num-images", "1"]
    line = _one_error_line(_invoke(*base, *args, "--output", str(tmp_path / "out")))
    assert expected in line, line


def test_nan_in_a_run_file_names_file_and_line(tmp_path):
    run_file = tmp_path / "run.yaml"
    run_file.write_text("output: out\nmodels: [tiny]\nconcepts: [church]\nnum_images: 1\nprobes:\n"
                        "  - name: noise_based\n    params:\n      eta_values: [1.0, .nan]\n")
    line = _one_error_line(_invoke(str(run_file)))
    assert line == (f"error: {run_file}:8: probe noise_based params: eta_values.1: "
                    "Input should be a finite number (got nan)")


@pytest.mark.parametrize(
    "dimension, expected",
    [
        ("eta: {low: .nan, high: 3}", "space.eta.low: Input should be a finite number"),
        ("eta: {low: 0, high: .inf}", "space.eta.high: Input should be a finite number"),
        ("eta: {values: [1.0, .nan]}", "space.eta.values: nan is not a finite number"),
        ("eta: {low: 0, high: 3, grid: [-.inf]}", "space.eta.grid: -inf is not a finite number"),
        ("guidance_scale: {low: -1.0e308, high: 1.0e308}", "the range -1e+308 to 1e+308 is too wide"),
    ],
)
def test_nan_and_infinity_in_search_spaces(tmp_path, dimension, expected):
    config = tmp_path / "space.yaml"
    config.write_text(f"probe: noise_based\nspace:\n  {dimension}\n")
    line = _one_error_line(runner.invoke(app, ["tune", str(config), *TUNE_BASE, "--output", str(tmp_path / "o")]))
    assert line.startswith(f"error: {config}:3") and expected in line, line


def test_every_params_and_options_class_rejects_nan():
    """The one mechanism: allow_inf_nan=False on the shared bases reaches every probe's params and
    every judge's options (and the run, model, concept and tune specs through Frozen)."""
    from engine.probe import get_probe_class, probe_names
    from engine.scoring.registry import get_judge_class, judge_names
    from engine.specs.base import Frozen

    classes = [get_probe_class(name).params_class for name in probe_names()]
    classes += [get_judge_class(name).options_class for name in judge_names()]
    from engine.specs.runs import RunSpec
    from engine.tune.space import ChoiceDimension, RangeDimension, TuneSpec

    classes += [RunSpec, TuneSpec, ChoiceDimension, RangeDimension]
    for model in classes:
        assert model.model_config.get("allow_inf_nan") is False, model.__name__
    assert issubclass(RunSpec, Frozen) and issubclass(TuneSpec, Frozen)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("output: [unclosed\n", "{path}:2:1: malformed YAML: expected ',' or ']', but got '<stream end>' "
         "(while parsing a flow sequence that starts at line 1, column 9)"),
        ("output: o\n  num_images: 2\n", "{path}:2:13: malformed YAML: mapping values are not allowed here"),
        ("output: o\nnum_images: @1\n", "{path}:2:13: malformed YAML: found character '@' that cannot start"),
        ("output: !!python/object:os.system x\n", "{path}:1:9: malformed YAML: could not determine a constructor"),
        ("output: a\x07b\n", "{path}:1:10: malformed YAML: special characters are not allowed"),
        ("num_images: 1\noutput: o\nnum_images: 2\n",
         "{path}:3:1: key 'num_images' is written twice (first at line 1)"),
        ("- a\n- b\n", "{path}: expected a mapping of keys at the top level"),
    ],
)
def test_yaml_errors_name_file_line_and_column(tmp_path, text, expected):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    line = _one_error_line(_invoke(str(path)))
    assert line.startswith("error: " + expected.format(path=path)), line


def test_unreadable_run_files_are_one_line(tmp_path):
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    assert "not a UTF-8 text file" in _one_error_line(_invoke(str(binary)))
    assert "is a folder, not a YAML file" in _one_error_line(_invoke(str(tmp_path)))


def test_run_file_errors_name_the_line_and_flags_name_the_flag(tmp_path):
    run_file = tmp_path / "run.yaml"
    run_file.write_text("output: out\nmodels: [tiny]\nconcepts: [church]\nprobes: [standard_prompt]\n"
                        "num_images: 0\n")
    assert _one_error_line(_invoke(str(run_file))).startswith(f"error: {run_file}:5: num_images: Input should be")
    line = _one_error_line(_invoke(str(run_file), "--set", "num_images=3", "--set", "batch_size=0"))
    assert line.startswith("error: --set batch_size=0: batch_size: Input should be greater than or equal to 1")
    line = _one_error_line(_invoke(*BASE[:-2], "--num-images", "0", "--output", str(tmp_path / "o")))
    assert line.startswith("error: --num-images: num_images: Input should be greater than or equal to 1")
    assert _one_error_line(_invoke(*BASE[:4], "--probe", "standard", "--num-images", "1", "--output", "o")
                           ).startswith("error: --probe: unknown probe 'standard'")
    assert _one_error_line(_invoke("--model", "tinyy", *BASE[2:], "--output", "o")
                           ).startswith("error: --model: unknown model 'tinyy'")


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--algorithm", "nonsense"], "error: --algorithm: algorithm: Input should be 'tpe', 'random' or 'grid'"),
        (["--objective", "best"], "error: --objective: objective: unknown objective 'best'"),
        (["--set", "num_samples=0"], "error: --set num_samples=0: num_samples: Input should be greater than"),
        (["--set", "space.eta.low=nan"], "error: --set space.eta.low=nan: space.eta.low: Input should be a finite"),
        (["--set", "params.guidance_scale=-.inf"],
         "error: --set params.guidance_scale=-.inf: probe noise_based params: guidance_scale: Input should be"),
    ],
)
def test_tune_flags_are_blamed_not_the_shipped_config(tmp_path, args, expected):
    line = _one_error_line(runner.invoke(app, ["tune", "--probe", "noise_based", *TUNE_BASE, *args,
                                               "--output", str(tmp_path / "o")]))
    assert line.startswith(expected) and "noise_based.yaml" not in line, line


def test_a_check_of_a_whole_dimension_names_the_shipped_file_and_the_set(tmp_path):
    line = _one_error_line(runner.invoke(app, ["tune", "--probe", "noise_based", *TUNE_BASE, "--set",
                                               "space.eta.low=5", "--output", str(tmp_path / "o")]))
    assert line.startswith("error: shipped config ") and "configs/tune/noise_based.yaml:" in line
    assert line.endswith(", --set space.eta.low=5: space.eta: low 5 > high 3"), line


def test_train_classifier_settings_are_one_line(tmp_path):
    line = _one_error_line(runner.invoke(app, ["train-classifier", "church", "--lr", "0",
                                               "--output-dir", str(tmp_path / "c")]))
    assert line.startswith("error: --lr: learning_rate: Input should be greater than 0")


def test_a_line_break_in_a_bad_value_stays_on_one_line(tmp_path):
    line = _one_error_line(_invoke(*BASE, "--set", "output=\"a\\nb\"", "--set", "\"x\u2028y\"=1",
                                   "--output", str(tmp_path / "o")))
    assert "unknown key" in line
