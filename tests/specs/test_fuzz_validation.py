"""Property-based: whatever a user writes into a run file, `--set` or `--probe-param`, `engine run`
either rejects it with one `error:` line and exit 2 (no traceback), or accepts it. Acceptance is
seen when the run reaches execution or a model load, both replaced here by a marker exception,
so no case starts Ray, loads a model or writes anything.

Hypothesis runs a fixed, derandomized sequence of a few hundred cases, in seconds.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import engine.models.loading
import engine.pipeline.run
from engine.cli import app
from engine.probe import get_probe_class, probe_names
from engine.specs.runs import RunSpec

runner = CliRunner()
# Examples per test come from the hypothesis profile (tests/conftest.py: `ci` 100, `dev` 15).
FUZZ = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


class ReachedExecution(Exception):
    """Raised by the stand-ins of execute and the model loaders: validation accepted the input."""


def non_finite_floats(value, path: str = "") -> list[str]:
    """Where in a JSON-like value a NaN or infinity sits."""
    if isinstance(value, float) and not math.isfinite(value):
        return [path or "(top)"]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in non_finite_floats(v, f"{path}.{k}")]
    if isinstance(value, (list, tuple)):
        return [p for i, v in enumerate(value) for p in non_finite_floats(v, f"{path}.{i}")]
    return []


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder for run files, with execution and model loading made impossible."""
    with pytest.MonkeyPatch.context() as patch:
        def reached(*args, **kwargs):
            raise ReachedExecution

        def execute(grid, *args, **kwargs):
            # An accepted run must be one worth running: no NaN or infinity anywhere in its config.
            bad = non_finite_floats(grid.resolved_config())
            assert not bad, f"accepted a run with non-finite values at {bad}"
            raise ReachedExecution

        patch.setattr(engine.pipeline.run, "execute", execute)
        patch.setattr(engine.models.loading, "load_base_pipeline", reached)
        patch.setattr(engine.models.loading, "load_unet", reached)
        yield tmp_path_factory.mktemp("fuzz")


def check_outcome(result) -> None:
    """Valid (reached execution) or one error line with exit 2; anything else is an engine bug."""
    if isinstance(result.exception, ReachedExecution):
        return
    assert not isinstance(result.exception, AssertionError), str(result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, f"exit {result.exit_code}: {result.exception!r}\n{result.output}"
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output


# --------------------------------------------------------------------------- values a user might write

PATH_LIKE = ["", ".", "..", "/", "/etc/passwd", "/dev/null", "~", "~/x", "../../x", "a/b", "a\\b", "C:\\x",
             "out/", "./out", "x" * 300, "nul\x00byte", "spaces in name", "üñíçødé/路径", "-rf", "$HOME", "*"]
HUGE = [2**63, -(2**63), 10**30, -(10**30), 10**400, 1e308, -1e308, 5e-324]
NON_FINITE = [math.nan, math.inf, -math.inf, "nan", "inf", "-inf", "Infinity", ".nan", ".inf"]
NAMES = ["tiny", "tiny_erased", "church", "van_gogh", "standard_prompt", "noise_based", "clip", "clip:tiny",
         "imagenet:tiny", "auto", "cpu", "cuda", "sdpa", "none"]

junk_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-3, max_value=600), st.sampled_from(HUGE),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(NON_FINITE),
    st.text(max_size=12), st.sampled_from(PATH_LIKE), st.sampled_from(NAMES),
)
junk = st.recursive(
    junk_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=6,
)
# Values of the right shape and near the right range, so that many cases pass the type checks and
# exercise the checks behind them (bounds, cross-field rules, expand_run).
small_floats = st.floats(min_value=-1.0, max_value=60.0, allow_nan=False)
plausible = st.one_of(
    st.integers(min_value=0, max_value=60), small_floats, st.booleans(), st.sampled_from(NAMES),
    st.lists(small_floats, max_size=3), st.lists(st.integers(min_value=0, max_value=60), max_size=3),
)
# Two parts plausible to one part junk.
values = st.one_of(plausible, plausible, junk)


def _fields(probe: str) -> list[str]:
    return sorted(get_probe_class(probe).params_class.model_fields)


RUN_KEYS = sorted(RunSpec.model_fields)
ALL_PARAM_KEYS = sorted({key for name in probe_names() for key in _fields(name)})
junk_keys = st.text(min_size=1, max_size=10)
keys = st.one_of(st.sampled_from(RUN_KEYS), st.sampled_from(RUN_KEYS), junk_keys)
probe_name = st.one_of(st.sampled_from(probe_names()), st.sampled_from(probe_names()), st.text(max_size=10))


def param_keys(probe: str):
    """Mostly the probe's own fields, sometimes another probe's, sometimes junk."""
    own = st.sampled_from(_fields(probe)) if probe in probe_names() else junk_keys
    return st.one_of(own, own, own, st.sampled_from(ALL_PARAM_KEYS), junk_keys)


@st.composite
def probe_entries(draw):
    """A probe entry: a name, or {name, params} whose params mix real fields with junk values."""
    name = draw(probe_name)
    if draw(st.booleans()):
        return name
    params = draw(st.dictionaries(param_keys(name), values, max_size=3))
    if draw(st.booleans()):  # a small, often valid, generation setting keeps accepted cases cheap
        params.setdefault("num_inference_steps", 2)
    return {"name": name, "params": params}


@st.composite
def run_data(draw, output: str):
    """A valid minimal run, then a few keys replaced, dropped or added with arbitrary values."""
    data = {"output": output, "models": ["tiny"], "base_model": "tiny", "concepts": ["church"], "judges": [],
            "probes": [draw(probe_entries())], "num_images": draw(st.integers(min_value=1, max_value=3))}
    for _ in range(draw(st.integers(min_value=0, max_value=2))):
        action = draw(st.sampled_from(["replace", "replace", "drop", "add", "probes"]))
        key = draw(keys)
        if action == "drop":
            data.pop(key, None)
        elif action == "probes":
            data["probes"] = draw(st.lists(st.one_of(probe_entries(), probe_entries(), junk), max_size=3))
        else:
            data[key] = draw(values)
    return data


def _yaml(value) -> str:
    return yaml.safe_dump(value, allow_unicode=True, default_flow_style=True, width=10_000).strip()


# --------------------------------------------------------------------------- properties


@FUZZ
@given(data=st.data())
def test_run_files(workdir, data):
    """Run files: generated mappings dumped as YAML, or raw text and bytes that may not parse at all."""
    path = workdir / "run.yaml"
    kind = data.draw(st.sampled_from(["mapping", "mapping", "mapping", "text", "bytes"]))
    if kind == "mapping":
        path.write_text(yaml.safe_dump(data.draw(run_data(str(workdir / "out"))), allow_unicode=True))
    elif kind == "text":
        path.write_text(data.draw(st.text(max_size=60)), encoding="utf-8")
    else:
        path.write_bytes(data.draw(st.binary(max_size=60)))
    check_outcome(runner.invoke(app, ["run", str(path)]))


@st.composite
def set_overrides(draw):
    """`--set key.sub=value`: real and junk keys, values as YAML text or raw strings."""
    key = draw(st.one_of(keys, st.builds(lambda a, b: f"{a}.{b}", keys, st.text(max_size=6))))
    raw = draw(st.one_of(values.map(_yaml), st.text(max_size=12)))
    return draw(st.sampled_from([f"{key}={raw}"] * 5 + [key, f"={raw}", f"{key}=={raw}"]))


@FUZZ
@given(overrides=st.lists(set_overrides(), min_size=1, max_size=3), num_images=st.sampled_from([1, 2, 0, -1, 10**9]))
def test_set_overrides(workdir, overrides, num_images):
    args = ["run", "--model", "tiny", "--concept", "church", "--probe", "standard_prompt", "--base-model", "tiny",
            "--num-images", str(num_images), "--output", str(workdir / "out"), "--set", "judges=[]",
            "--probe-param", "standard_prompt.num_inference_steps=2"]
    for item in overrides:
        args += ["--set", item]
    check_outcome(runner.invoke(app, args))


@st.composite
def probe_params(draw, probe: str):
    """`--probe-param PROBE.KEY=VALUE` for the run's probe (mostly) or another, real and junk keys."""
    owner = draw(st.one_of(st.just(probe), st.just(probe), st.sampled_from(probe_names()), st.text(max_size=6)))
    key = draw(param_keys(owner))
    raw = draw(st.one_of(values.map(_yaml), values.map(_yaml), st.text(max_size=12),
                         st.sampled_from(["[]", "[nan]", "[.inf]", "1e999", "[1, 1]", "-0.0", "[0.5, 1e308]"])))
    return f"{owner}.{key}={raw}"


@FUZZ
@given(data=st.data(), probe=st.sampled_from(probe_names()),
       extra_flags=st.lists(st.sampled_from(["--allow-pickle", "--classifier-dir"]), max_size=2, unique=True))
def test_probe_params(workdir, data, probe, extra_flags):
    args = ["run", "--model", "tiny", "--concept", "church", "--probe", probe, "--num-images", "1",
            "--output", str(workdir / "out"), "--set", "judges=[]", "--base-model", "tiny"]
    for item in data.draw(st.lists(probe_params(probe), min_size=1, max_size=3)):
        args += ["--probe-param", item]
    for flag in extra_flags:
        args += [flag] if flag == "--allow-pickle" else [flag, str(workdir / "classifiers")]
    check_outcome(runner.invoke(app, args))


def test_the_harness_sees_valid_input_as_valid(workdir):
    """A control: a valid run reaches (the stand-in of) execution, so 'valid' is really detected."""
    result = runner.invoke(app, ["run", "--model", "tiny", "--concept", "church", "--probe", "standard_prompt",
                                 "--num-images", "1", "--output", str(workdir / "out"), "--set", "judges=[]"])
    assert isinstance(result.exception, ReachedExecution), result.output
    assert not Path(workdir / "out").exists()
