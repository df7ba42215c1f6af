"""Models declare what they erased; the grid pairs them with it (engine.pipeline.pairing); model
families expand methods x concepts; the CLI labels models given by path."""

from __future__ import annotations

import hashlib
import json

import pytest
from typer.testing import CliRunner

import engine.cli.run
from engine.cli import app
from engine.errors import UserError
from engine.models.families import model_families
from engine.models.resolve import resolve_model
from engine.pipeline.grid import expand_run
from engine.specs.concepts import available_concepts, load_concept
from engine.specs.runs import ModelSpec, RunSpec

FAST = {"num_inference_steps": 2, "height": 32, "width": 32}
REAL = sorted(n for n in available_concepts() if not n.startswith("toy_"))
TOY = sorted(n for n in available_concepts() if n.startswith("toy_"))
ERASED_CHURCH = {"name": "e-church", "pretrained": "tiny-erased", "method": "esdx", "erased": ["church"]}
runner = CliRunner()


def _spec(tmp_path, models, concepts, probes, base="tiny", num_images=2, **extra) -> RunSpec:
    return RunSpec(output=str(tmp_path / "out"), models=models, base_model=base, concepts=concepts,
                   probes=probes, num_images=num_images, **extra)


def _with_models(spec: RunSpec, models: list) -> RunSpec:
    return RunSpec.model_validate({**spec.model_dump(), "models": models})


def test_the_original_concepts_and_the_toy_shapes_are_separate_sets():
    assert len(REAL) == 13 and len(TOY) == 8
    assert {load_concept(n).concept_set for n in REAL} == {"default"}
    assert {load_concept(n).concept_set for n in TOY} == {"toy"}


# --------------------------------------------------------------------------- the paired grid


@pytest.fixture(scope="module")
def paired_plan(tmp_path_factory):
    probes = [
        {"name": "standard_prompt", "params": FAST},
        {"name": "noise_based", "params": {**FAST, "eta_values": [1.0, 1.5], "variance_scales": [1.0],
                                           "keep_all_candidates": True, "selector": "none"}},
        {"name": "diffusion_completion", "params": {**FAST, "handover_steps": [0]}},
        {"name": "inpainting", "params": FAST},
        {"name": "interference", "params": FAST},
    ]
    spec = _spec(tmp_path_factory.mktemp("paired"), ["tiny", ERASED_CHURCH], ["church", "golf_ball", "van_gogh"],
                 probes)
    return expand_run(spec)


def test_an_erased_model_never_runs_a_recovery_probe_on_a_concept_it_did_not_erase(paired_plan):
    rows = [r for r in paired_plan.rows if r.model == "e-church"]
    recovery = [r for r in rows if r.probe != "interference"]
    assert recovery and {(r.concept, r.target_concept, r.role) for r in recovery} == {("church", "church", "recovery")}
    # 2 prompts x (1 standard + 2 noise candidates + 1 hand-over + 1 inpainting)
    assert len(recovery) == 2 * 5
    assert {r.erased for r in rows} == {("church",)} and {r.method for r in rows} == {"esdx"}


def test_interference_covers_the_other_12_real_concepts_whatever_the_run_lists(paired_plan):
    rows = [r for r in paired_plan.rows if r.model == "e-church" and r.probe == "interference"]
    assert {r.role for r in rows} == {"preservation"} and {r.concept for r in rows} == {"church"}
    assert sorted({r.target_concept for r in rows}) == [n for n in REAL if n != "church"]
    for target in {r.target_concept for r in rows}:
        expected = load_concept(target).first_prompts(2)
        assert [(r.prompt_index, r.prompt, r.seed) for r in rows if r.target_concept == target] == expected
    # The grid carries every concept a row names, so the scorer can judge the unlisted targets.
    assert sorted(paired_plan.concepts) == REAL


def test_the_base_model_runs_each_listed_concept_and_every_interference_target(paired_plan):
    rows = [r for r in paired_plan.rows if r.model == "tiny"]
    assert {r.role for r in rows} == {"base"} and {r.method for r in rows} == {"none"}
    assert {r.probe for r in rows} == {"standard_prompt", "noise_based", "inpainting", "interference"}
    standard = [r for r in rows if r.probe == "standard_prompt"]
    assert {r.concept for r in standard} == {"church", "golf_ball", "van_gogh"} and len(standard) == 3 * 2
    reference = {(r.target_concept, r.prompt_index, r.seed, r.params) for r in rows if r.probe == "interference"}
    assert all(r.concept == r.target_concept for r in rows if r.probe == "interference")
    # Every preservation row has the base model's row on the same prompt, seed and params.
    erased = [r for r in paired_plan.rows if r.model == "e-church" and r.probe == "interference"]
    assert {(r.target_concept, r.prompt_index, r.seed, r.params) for r in erased} <= reference
    assert len(reference) == 13 * 2  # the 12 targets and the listed church


def test_a_one_concept_run_of_an_erased_model(tmp_path):
    grid = expand_run(_spec(tmp_path, [ERASED_CHURCH], ["church"], [{"name": "interference", "params": FAST}],
                          num_images=1))
    assert sorted(r.target_concept for r in grid.rows) == [n for n in REAL if n != "church"]


def test_toy_concepts_never_mix_with_real_ones(tmp_path):
    grid = expand_run(_spec(tmp_path, ["toy-esdx-circle"], ["toy_circle", "church"],
                          ["standard_prompt", "interference"], base="toy-base"))
    assert {r.concept for r in grid.rows} == {"toy_circle"}
    interference = {r.target_concept for r in grid.rows if r.probe == "interference"}
    assert sorted(interference) == [n for n in TOY if n != "toy_circle"]


def test_a_runs_concepts_filter_which_erased_concepts_are_evaluated(tmp_path):
    grid = expand_run(_spec(tmp_path, ["toy-base", "toyworld"], ["toy_circle"], ["standard_prompt"], base="toy-base"))
    assert [m.name for m in grid.models] == ["toy-base", "esdx_toy_circle", "uce_toy_circle"]
    assert grid.skipped_models == ["esdx_toy_triangle", "uce_toy_triangle"]
    assert {(r.model, r.concept) for r in grid.rows if r.role == "recovery"} == {
        ("esdx_toy_circle", "toy_circle"), ("uce_toy_circle", "toy_circle")}
    with pytest.raises(UserError, match="no listed concept"):
        expand_run(_spec(tmp_path, ["toyworld"], ["toy_square"], ["standard_prompt"], base="toy-base"))


def test_a_model_declaring_nothing_keeps_its_full_grid_and_row_ids(tmp_path):
    spec = _spec(tmp_path, ["tiny-erased"], ["church", "golf_ball"], [{"name": "standard_prompt", "params": FAST}])
    plain = expand_run(spec).rows
    # Next to an erased model, it still gets the full product, with the same row ids.
    beside_rows = expand_run(_with_models(spec, ["tiny-erased", ERASED_CHURCH])).rows
    beside = [r for r in beside_rows if r.model == "tiny-erased"]
    assert [r.row_id for r in beside] == [r.row_id for r in plain]
    assert {r.role for r in plain} == {"unpaired"} and {r.concept for r in plain} == {"church", "golf_ball"}
    # The identity hashed before models declared erased concepts (resume of existing runs).
    for row in plain:
        identity = {
            "model": {"name": "tiny-erased", "pretrained": "tiny-erased", "unet": None, "method": "random-kv",
                      "revision": None, "allow_pickle": False},
            "base": None, "concept": row.concept, "target_concept": row.target_concept, "probe": "standard_prompt",
            "params": row.params, "prompt": row.prompt, "prompt_index": row.prompt_index, "seed": row.seed,
        }
        text = json.dumps(identity, sort_keys=True, separators=(",", ":"))
        assert row.row_id == hashlib.sha256(text.encode()).hexdigest()[:32]


def test_an_unlabelled_model_hashes_as_before_but_is_labelled_unknown(tmp_path):
    spec = _spec(tmp_path, [{"name": "m", "pretrained": "tiny-erased"}], ["church"], ["standard_prompt"])
    row = expand_run(spec).rows[0]
    assert row.method == "unknown" and row.role == "unpaired"
    labelled = _with_models(spec, [{"name": "m", "pretrained": "tiny-erased", "method": "none"}])
    assert expand_run(labelled).rows[0].row_id == row.row_id  # `none` was the unset label's old default


def test_erased_declarations_are_checked():
    with pytest.raises(ValueError, match="marks the un-erased base model"):
        ModelSpec(name="x", pretrained="tiny", method="none", erased=["church"])
    with pytest.raises(UserError, match="erased 'chruch', which is not a configured concept"):
        expand_run(RunSpec(output="o", models=[{"name": "x", "pretrained": "tiny", "erased": ["chruch"]}],
                         concepts=["church"], probes=["standard_prompt"], num_images=1))


# --------------------------------------------------------------------------- families


def test_the_original_family_is_7_methods_x_13_concepts():
    members = model_families()["wace"].members()
    assert len(members) == 91
    church = resolve_model("uce_church", check_source=False)
    assert church == members["uce_church"]
    assert church.pretrained == "DiffusionConceptErasure/uce_church"
    assert (church.method, church.erased) == ("uce", ["church"])
    assert {m.method for m in members.values()} == {"esdx", "esdu", "ga", "uce", "rece", "stereo", "tv"}
    assert sorted({c for m in members.values() for c in m.erased}) == REAL


def test_the_toy_family_is_the_shipped_built_ins():
    members = model_families()["toyworld"].members()
    assert {name: (m.pretrained, m.method, m.erased) for name, m in members.items()} == {
        "esdx_toy_circle": ("toy-esdx-circle", "esd-x", ["toy_circle"]),
        "esdx_toy_triangle": ("toy-esdx-triangle", "esd-x", ["toy_triangle"]),
        "uce_toy_circle": ("toy-uce-circle", "uce", ["toy_circle"]),
        "uce_toy_triangle": ("toy-uce-triangle", "uce", ["toy_triangle"]),
    }
    for member in members.values():  # the built-ins declare the same
        builtin = resolve_model(member.pretrained)
        assert (builtin.method, builtin.erased) == (member.method, member.erased)


def test_a_family_file_with_per_method_overrides(tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "mine.yaml").write_text(
        'pretrained: "org/{method}-{concept}"\nmethods: [a, b]\nconcepts: {church: ch, golf_ball: golf}\n'
        "exclude: [b_golf_ball]\noverrides:\n"
        '  b: {pretrained: "org/base", unet: "/ckpt/{method}/{concept}/unet", revision: v2, label: B-method}\n'
    )
    monkeypatch.setenv("ENGINE_CONFIG_DIR", str(tmp_path))
    members = model_families()["mine"].members()
    assert list(members) == ["a_church", "a_golf_ball", "b_church"]
    assert (members["a_golf_ball"].pretrained, members["a_golf_ball"].method) == ("org/a-golf", "a")
    b = resolve_model("b_church", check_source=False)
    assert (b.pretrained, b.unet, b.revision, b.method, b.erased) == (
        "org/base", "/ckpt/b/ch/unet", "v2", "B-method", ["church"])
    with pytest.raises(UserError, match="is a model family"):
        resolve_model("mine")
    (tmp_path / "models" / "bad.yaml").write_text('pretrained: "org/{mthod}"\nmethods: [a]\nconcepts: [church]\n')
    with pytest.raises(UserError, match=r"may use only \{method\} and \{concept\}"):
        model_families()["bad"].members()


def test_engine_models_lists_methods_erased_concepts_and_family_members():
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any(line.split()[:3] == ["toy-esdx-circle", "esd-x", "toy_circle"] for line in lines)
    assert any(line.split()[:3] == ["stereo_van_gogh", "stereo", "van_gogh"] for line in lines)
    assert "family wace (7 methods x 13 concepts, 91 models" in result.output


# --------------------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory, tiny_pipe):
    root = tmp_path_factory.mktemp("folders")
    tiny_pipe.save_pretrained(root / "tiny")
    tiny_pipe.unet.save_pretrained(root / "unet")
    return root


@pytest.fixture
def planned(monkeypatch):
    """`engine run` up to its grid: the grid it would execute, and nothing generated."""
    plans = []

    def planned_only(grid, *args, on_locked=None, **kwargs):
        if on_locked is not None:  # what a run prints once it holds the output's lock
            on_locked()
        plans.append(grid)

    monkeypatch.setattr(engine.cli.run, "execute_and_print", planned_only)
    return plans


def _run(*args):
    result = runner.invoke(app, ["run", *args])
    assert result.exit_code == 0, result.output
    return result


def test_a_model_given_by_path_without_method_is_not_labelled_as_the_base(tiny_folders, planned, tmp_path):
    common = ["--probe", "standard_prompt", "--num-images", "1", "--output", str(tmp_path / "o"),
              "--base-model", "tiny"]
    _run("--model", str(tiny_folders / "tiny"), "--concept", "church", *common)
    _run("--unet", str(tiny_folders / "unet"), "--concept", "church", *common)
    for grid in planned:
        assert {(r.method, r.role) for r in grid.rows} == {("unknown", "unpaired")}
    # The base model's own folder is the base model, labelled `none`.
    _run("--model", str(tiny_folders / "tiny"), "--concept", "church", *common[:-1], str(tiny_folders / "tiny"))
    assert {(r.method, r.role) for r in planned[-1].rows} == {("none", "base")}


def test_method_and_erased_flags_label_the_command_line_models(tiny_folders, planned, tmp_path):
    common = ["--probe", "standard_prompt", "--probe", "interference", "--num-images", "1",
              "--output", str(tmp_path / "o"), "--base-model", "tiny"]
    result = _run("--model", str(tiny_folders / "tiny"), "--method", "uce", "--erased", "church", *common)
    _run("--unet", str(tiny_folders / "unet"), "--method", "esdx", "--erased", "church", *common)
    for grid, method in zip(planned, ["uce", "esdx"], strict=False):
        assert {r.method for r in grid.rows} == {method} and {r.erased for r in grid.rows} == {("church",)}
        assert {(r.probe, r.role) for r in grid.rows} == {("standard_prompt", "recovery"),
                                                         ("interference", "preservation")}
        assert len(grid.rows) == 1 + 12  # --concept defaults to the erased concepts
    # Before any work: rows per model x probe.
    lines = [line for line in result.output.splitlines() if line.strip(" ─")]  # the rule under the headers: no text
    header, table = lines[0], lines[1:3]
    assert header.startswith("13 rows (recovery 1, preservation 12)")
    assert table[0].split()[:5] == ["model", "method", "erased", "standard_prompt", "interference"]
    assert table[1].split()[1:] == ["uce", "church", "1", "12", "13"]


def test_labelling_flags_need_a_command_line_model(tmp_path):
    result = runner.invoke(app, ["run", "--erased", "church", "--probe", "standard_prompt", "--num-images", "1",
                                 "--output", str(tmp_path)])
    assert result.exit_code == 2 and "--method and --erased label the --model or --unet models" in result.output
    result = runner.invoke(app, ["run", "--model", "wace", "--method", "x", "--concept", "church", "--probe",
                                 "standard_prompt", "--num-images", "1", "--output", str(tmp_path)])
    assert result.exit_code == 2 and "it is a family" in result.output


def test_a_model_that_erased_several_concepts_gets_one_interference_row_per_request(tmp_path):
    both = {"name": "e-two", "pretrained": "tiny-erased", "method": "esdx", "erased": ["church", "tench"]}
    grid = expand_run(_spec(tmp_path, [both], ["church", "tench"],
                            ["standard_prompt", {"name": "interference", "params": FAST}], num_images=1))
    interference = [r for r in grid.rows if r.probe == "interference" and r.model == "e-two"]
    requests = [(r.target_concept, r.prompt, r.seed) for r in interference]
    assert len(requests) == len(set(requests)) == len(REAL) - 2  # the 11 others, once each
    assert {r.concept for r in interference} == {"church"}  # the first erased concept of the set, in run order
    assert {r.target_concept for r in interference}.isdisjoint({"church", "tench"})
    recovery = {(r.concept, r.probe) for r in grid.rows if r.model == "e-two" and r.role == "recovery"}
    assert recovery == {("church", "standard_prompt"), ("tench", "standard_prompt")}  # recovery stays per concept
