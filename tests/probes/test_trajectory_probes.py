"""The trajectory probes' own properties on the tiny models (3 DDIM steps, 32x32 images), and each
probe by name through `engine run` / `engine probes` on a local Ray."""

from __future__ import annotations

import json
from pathlib import Path
from typing import get_args

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from engine import sampling
from engine.cli import app
from engine.errors import UserError
from engine.models.resolve import resolve_model
from engine.pipeline.grid import ProbeChoice, expand_rows, expand_run
from engine.probe import ProbeBatch, ProbeContext, WorkRow, parse_params, row_generator
from engine.results import decode_png, read_rows
from engine.specs.concepts import load_concept
from engine.specs.runs import RunSpec
from probes.diffusion_completion import DiffusionCompletionProbe
from probes.inpainting import InpaintingProbe, mask_box
from probes.interference import InterferenceProbe
from probes.noise_based import NoiseBasedParams, NoiseBasedProbe

STEPS = 3
FAST = {"num_inference_steps": STEPS, "height": 32, "width": 32}
PROMPT = "a picture of a church"
TOLERANCE = 2  # uint8 levels between differently batched float computations


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """One thread: two threads per process oversubscribe our shared 2-core machines."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def rows(seeds, concept="church", prompt=PROMPT):
    return [WorkRow(f"r{s}", "m", "x", concept, concept, "p", "{}", prompt, i, s) for i, s in enumerate(seeds)]


def context(base, cache_dir: Path) -> ProbeContext:
    def brightness(selector, images, concept_name, regions):  # stand-in selector: deterministic
        return [float(np.asarray(image, dtype=np.float64).mean()) for image in images]

    return ProbeContext(torch.device("cpu"), lambda: base, load_concept, cache_dir, selector_scores=brightness)


def run(probe, params, pipe, base, cache_dir, seeds=(7, 11)):
    return probe.run(ProbeBatch(rows(seeds), params, pipe, context(base, cache_dir)))


def ddim(pipe, seeds, prompt=PROMPT):
    """The pipeline's own call with its DDIM scheduler at eta = 0, one generator per seed."""
    result = pipe(
        prompt=[prompt] * len(seeds),
        num_inference_steps=STEPS,
        guidance_scale=7.5,
        height=32,
        width=32,
        eta=0.0,
        generator=[row_generator(s) for s in seeds],
        output_type="np",
    )
    return [np.round(np.clip(image, 0, 1) * 255).astype(np.uint8) for image in result.images]


def assert_close(a, b, tolerance=TOLERANCE):
    assert np.abs(a.astype(int) - b.astype(int)).max() <= tolerance


def differ(a, b) -> float:
    return float(np.abs(a.astype(int) - b.astype(int)).mean())


# --------------------------------------------------------------------------- noise_based


def test_noise_eta_zero_v_one_is_plain_deterministic_ddim(tiny_pipe, tmp_path):
    params = parse_params("noise_based", {**FAST, "eta_values": [0.0], "variance_scales": [1.0], "selector": "clip",
                                          "initial_noise": "shared"})
    output = run(NoiseBasedProbe(), params, tiny_pipe, tiny_pipe, tmp_path)
    for image, reference in zip(output.images, ddim(tiny_pipe, [7, 11]), strict=False):
        assert_close(image, reference)


@pytest.mark.parametrize("initial_noise", ["per_candidate", "shared"])
def test_noise_candidate_alone_equals_its_copy_in_the_sweep(initial_noise, tiny_erased_pipe, tmp_path):
    sweep = {**FAST, "eta_values": [0.5, 1.5], "variance_scales": [1.0, 1.04], "candidate_batch_size": 3,
             "initial_noise": initial_noise}
    probe = NoiseBasedProbe()
    full = run(probe, parse_params("noise_based", sweep), tiny_erased_pipe, None, tmp_path)
    singles = probe.expand_params(parse_params("noise_based", {**sweep, "keep_all_candidates": True}))
    assert [(p.eta_values, p.variance_scales, p.selector, p.initial_noise) for p in singles] == [
        ([0.5], [1.0], "none", initial_noise),
        ([0.5], [1.04], "none", initial_noise),
        ([1.5], [1.0], "none", initial_noise),
        ([1.5], [1.04], "none", initial_noise),
    ]
    for index, single_params in enumerate(singles):
        alone = run(probe, single_params, tiny_erased_pipe, None, tmp_path, seeds=(11,))
        assert alone.extras[0] == {
            "eta": single_params.eta_values[0],
            "variance_scale": single_params.variance_scales[0],
        }
        assert_close(alone.images[0], full.candidates[1][index])
    # Every candidate has its own noise: no two are the same image.
    candidates = full.candidates[0]
    assert min(differ(a, b) for i, a in enumerate(candidates) for b in candidates[i + 1 :]) > 0.5


def test_noise_candidates_of_one_prompt_start_from_different_latents(tiny_erased_pipe, tmp_path):
    """per_candidate (the default, as the original's sweep): each candidate's x_T is its own draw
    from (seed, eta, v); shared: all are the row seed's x_T, the standard probe's."""
    probe = NoiseBasedProbe()
    sweep = {**FAST, "eta_values": [0.0, 1.5], "variance_scales": [1.0, 1.04]}
    per_candidate = parse_params("noise_based", sweep)
    assert per_candidate.initial_noise == "per_candidate"
    row = rows([11])[0]
    candidates = per_candidate.candidates()

    def starts(params):
        generators, _ = probe.generators(params, [row] * len(candidates), candidates)
        return sampling.initial_latents(tiny_erased_pipe, generators, 32, 32)

    latents = starts(per_candidate)
    assert all(not torch.equal(latents[i], latents[j]) for i in range(4) for j in range(i + 1, 4))
    seed_start = sampling.initial_latents(tiny_erased_pipe, [row_generator(11)], 32, 32)[0]
    assert all(not torch.equal(x, seed_start) for x in latents)
    shared = starts(per_candidate.model_copy(update={"initial_noise": "shared"}))
    assert all(torch.equal(x, seed_start) for x in shared)
    # Seen in the images: at eta = 0 (no step noise) v changes nothing, so the two eta-0 candidates
    # differ only through their start: different per candidate, identical when shared.
    images = run(probe, per_candidate, tiny_erased_pipe, None, tmp_path, seeds=(11,)).candidates[0]
    assert differ(images[0], images[1]) > 0.5
    images = run(probe, per_candidate.model_copy(update={"initial_noise": "shared"}), tiny_erased_pipe, None,
                 tmp_path, seeds=(11,)).candidates[0]
    np.testing.assert_array_equal(images[0], images[1])


def test_noise_selector_keeps_the_argmax_and_records_every_score(tiny_erased_pipe, tmp_path):
    params = parse_params("noise_based", {**FAST, "eta_values": [0.5, 1.5], "variance_scales": [1.0, 1.04]})
    output = run(NoiseBasedProbe(), params, tiny_erased_pipe, None, tmp_path)
    for image, extras, candidates in zip(output.images, output.extras, output.candidates, strict=False):
        scores = [float(c.astype(np.float64).mean()) for c in candidates]
        assert extras["candidate_scores"] == pytest.approx(scores)
        chosen = int(np.argmax(scores))
        assert extras["selected_candidate"] == chosen and extras["selector"] == "clip"
        assert {"eta": extras["eta"], "variance_scale": extras["variance_scale"]} == params.candidates()[chosen]
        np.testing.assert_array_equal(image, candidates[chosen])


def test_noise_variance_scale_is_really_applied(tiny_erased_pipe, tmp_path):
    """Same candidate generator, v = 1.3 vs 1.0: only the probe's v can make the difference."""
    params = parse_params("noise_based", {**FAST, "eta_values": [1.5], "variance_scales": [1.3], "selector": "clip",
                                          "initial_noise": "shared"})
    image = run(NoiseBasedProbe(), params, tiny_erased_pipe, None, tmp_path, seeds=(7,)).images[0]

    def direct(v: float):
        schedule = sampling.DDIMSchedule.from_pipeline(tiny_erased_pipe, STEPS)
        embeddings = sampling.encode_prompts(tiny_erased_pipe, [PROMPT], "", 7.5)
        latents = sampling.initial_latents(tiny_erased_pipe, [row_generator(7)], 32, 32)
        latents = sampling.denoise(
            tiny_erased_pipe,
            latents,
            embeddings,
            schedule,
            7.5,
            torch.tensor([1.5]),
            torch.tensor([v]),
            [row_generator(7, 1.5, 1.3)],
        )
        return sampling.decode(tiny_erased_pipe, latents)[0]

    assert_close(image, direct(1.3))
    assert differ(image, direct(1.0)) > 1.0


def test_noise_selector_names_are_the_engines():
    from engine.scoring.selectors import SELECTOR_NAMES

    assert set(get_args(NoiseBasedParams.model_fields["selector"].annotation)) == set(SELECTOR_NAMES)


def test_noise_params_reject_a_sweep_without_a_choice():
    with pytest.raises(UserError, match="keep_all_candidates"):
        parse_params("noise_based", {"selector": "none"})
    with pytest.raises(UserError, match="selector"):
        parse_params("noise_based", {"selector": "resnet"})
    with pytest.raises(UserError, match="more than once"):
        parse_params("noise_based", {"eta_values": [1.0, 1.0]})
    assert len(NoiseBasedProbe().expand_params(parse_params("noise_based", {"keep_all_candidates": True}))) == 24


# --------------------------------------------------------------------------- diffusion_completion


def completion(k, erased, base, tmp_path, seeds=(7, 11)):
    params = parse_params("diffusion_completion", {**FAST, "handover_steps": [k]})
    return run(DiffusionCompletionProbe(), params, erased, base, tmp_path, seeds)


def test_completion_handing_over_after_the_last_step_is_the_base_ddim_image(tiny_erased_pipe, tiny_pipe, tmp_path):
    output = completion(STEPS - 1, tiny_erased_pipe, tiny_pipe, tmp_path)
    assert output.extras[0]["base_steps"] == STEPS and output.extras[0]["erased_steps"] == 0
    for image, reference in zip(output.images, ddim(tiny_pipe, [7, 11]), strict=False):
        assert_close(image, reference)


def test_completion_with_no_base_step_is_the_erased_ddim_image(tiny_erased_pipe, tiny_pipe, tmp_path):
    output = completion(-1, tiny_erased_pipe, tiny_pipe, tmp_path)
    assert output.extras[0]["base_steps"] == 0 and output.extras[0]["erased_steps"] == STEPS
    for image, reference in zip(output.images, ddim(tiny_erased_pipe, [7, 11]), strict=False):
        assert_close(image, reference)
    # ... and the hand-over point matters when the models differ.
    assert differ(output.images[0], completion(STEPS - 1, tiny_erased_pipe, tiny_pipe, tmp_path).images[0]) > 0.5


def test_completion_with_identical_models_gives_one_image_for_every_k(tiny_pipe, tmp_path):
    images = [completion(k, tiny_pipe, tiny_pipe, tmp_path, seeds=(7,)).images[0] for k in range(-1, STEPS)]
    for image in images[1:]:
        assert_close(image, images[0])


def test_completion_hands_over_at_the_next_timestep(tiny_erased_pipe, tiny_pipe, tmp_path):
    timesteps = sampling.DDIMSchedule.from_pipeline(tiny_pipe, STEPS).timesteps
    extras = completion(0, tiny_erased_pipe, tiny_pipe, tmp_path, seeds=(7,)).extras[0]
    assert extras == {"handover_step": 0, "base_steps": 1, "erased_steps": STEPS - 1, "handover_timestep": timesteps[1]}


def test_completion_params_one_row_per_k_and_k_within_the_schedule():
    probe = DiffusionCompletionProbe()
    expanded = probe.expand_params(parse_params("diffusion_completion", {}))
    assert [p.handover_steps for p in expanded] == [[0], [1], [2]]
    notebook = parse_params("diffusion_completion", {"handover_steps": [1, 2, 3, 5, 10, 15, 20]})
    assert len(probe.expand_params(notebook)) == 7
    with pytest.raises(UserError, match="outside"):
        parse_params("diffusion_completion", {"num_inference_steps": 3, "handover_steps": [3]})
    with pytest.raises(UserError, match="outside"):
        parse_params("diffusion_completion", {"handover_steps": [-2]})


# --------------------------------------------------------------------------- inpainting


class CountingPipeline:
    """The base pipeline, counting its generation calls."""

    def __init__(self, pipe):
        self.pipe, self.calls = pipe, 0

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.pipe(*args, **kwargs)


def test_mask_is_the_centre_square_scaled_to_the_image():
    assert mask_box(512, 512, 256, 8) == (128, 128, 384, 384)
    assert mask_box(64, 64, 256, 2) == (16, 16, 48, 48)
    assert mask_box(32, 32, 256, 2) == (8, 8, 24, 24)
    assert mask_box(768, 512, 256, 8) == (128, 256, 384, 512)


def test_inpainting_keeps_the_context_and_repaints_the_mask(tiny_erased_pipe, tiny_pipe, tmp_path):
    params = parse_params("inpainting", FAST)
    output = run(InpaintingProbe(), params, tiny_erased_pipe, tiny_pipe, tmp_path)
    references = ddim(tiny_pipe, [7, 11])  # the base model's standard image (its scheduler is DDIM)
    left, top, right, bottom = 8, 8, 24, 24
    inside = np.zeros((32, 32), bool)
    inside[top:bottom, left:right] = True
    outputs = zip(output.images, references, output.scoring_regions, output.extras, strict=True)
    for image, reference, region, extras in outputs:
        assert region == (left, top, right, bottom) and extras["mask_box"] == [left, top, right, bottom]
        assert_close(image[~inside], reference[~inside])
        assert differ(image[inside], reference[inside]) > 5
    # Without pasting, the frame is the VAE's decode of the blended latents: the mask is the same.
    unpasted = run(
        InpaintingProbe(), params.model_copy(update={"paste_context": False}), tiny_erased_pipe, tiny_pipe, tmp_path
    )
    np.testing.assert_array_equal(unpasted.images[0][inside], output.images[0][inside])


def test_inpainting_reference_is_made_once_for_every_erased_model(tiny_erased_pipe, tiny_pipe, tmp_path):
    base = CountingPipeline(tiny_pipe)
    params = parse_params("inpainting", FAST)
    probe = InpaintingProbe()
    erased_models = [tiny_erased_pipe, tiny_pipe, tiny_erased_pipe]
    sources = []
    for erased in erased_models:
        output = probe.run(ProbeBatch(rows([7, 11]), params, erased, context(base, tmp_path)))
        sources.append([extras["reference"] for extras in output.extras])
    assert base.calls == 1
    assert sorted(p.name for p in (tmp_path / "reference_images").glob("*.png")) == sorted(
        f"{source.removeprefix('cache:')}.png" for source in sources[0]
    )
    assert sources[0] == sources[1] == sources[2]
    # New prompts or settings make new references, and only for what is missing.
    probe.run(ProbeBatch(rows([7, 13]), params, tiny_erased_pipe, context(base, tmp_path)))
    assert base.calls == 2 and len(list((tmp_path / "reference_images").glob("*.png"))) == 3


def test_inpainting_reads_a_reference_folder(tiny_erased_pipe, tmp_path):
    folder = tmp_path / "refs" / "church"
    folder.mkdir(parents=True)
    references = {}
    for index, seed in enumerate([7, 11]):
        references[seed] = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(references[seed]).save(folder / f"church_{index:03d}_seed{seed}.png")
    params = parse_params("inpainting", {**FAST, "reference_dir": str(tmp_path / "refs")})
    output = run(InpaintingProbe(), params, tiny_erased_pipe, None, tmp_path)  # no base model needed
    outside = np.ones((32, 32), bool)
    outside[8:24, 8:24] = False
    for image, seed in zip(output.images, [7, 11], strict=False):
        np.testing.assert_array_equal(image[outside], references[seed][outside])
    concept = load_concept("church")
    with pytest.raises(UserError, match="no reference image for seed"):
        InpaintingProbe().work_prompts(concept, {"church": concept}, 3, params)  # the third seed has none


# --------------------------------------------------------------------------- interference


def test_interference_rows_cover_every_other_concept():
    names = ["church", "golf_ball", "van_gogh"]
    concepts = {name: load_concept(name) for name in names}
    choice = ProbeChoice("interference", parse_params("interference", FAST))
    work = expand_rows([resolve_model("tiny-erased")], None, concepts, [choice], 2)
    assert len(work) == 3 * 2 * 2
    for name in names:
        mine = [r for r in work if r.concept == name]
        assert {r.target_concept for r in mine} == set(names) - {name}
        for other in set(names) - {name}:
            expected = [(i, p, s) for i, p, s in concepts[other].first_prompts(2)]
            assert [(r.prompt_index, r.prompt, r.seed) for r in mine if r.target_concept == other] == expected


def test_interference_of_a_one_concept_run_draws_the_concepts_set(tmp_path):
    # A one-concept run used to be refused; the original drew every other concept of its set.
    spec = RunSpec(
        output=str(tmp_path), models=["tiny-erased"], concepts=["church"], probes=["interference"], num_images=1
    )
    targets = {r.target_concept for r in expand_run(spec).rows}
    assert len(targets) == 12 and "church" not in targets and not any(t.startswith("toy_") for t in targets)


def test_interference_needs_another_concept_of_its_set(tmp_path, monkeypatch):
    folder = tmp_path / "concepts"
    folder.mkdir()
    (folder / "lonely.yaml").write_text(
        "kind: object\ndisplay_name: lonely\nprompt: a picture of a lonely\nclip_text: a photo of a lonely\n"
        "concept_set: mine\nseeds: [1, 2]\n"
    )
    monkeypatch.setenv("ENGINE_CONFIG_DIR", str(tmp_path))
    spec = RunSpec(
        output=str(tmp_path / "out"), models=["tiny-erased"], concepts=["lonely"], probes=["interference"], num_images=1
    )
    with pytest.raises(UserError, match="concept set 'mine' of lonely has no other concept"):
        expand_run(spec)


def test_interference_generates_the_other_prompt(tiny_erased_pipe, tmp_path):
    golf = load_concept("golf_ball")
    work = [WorkRow("r", "m", "x", "church", "golf_ball", "interference", "{}", golf.prompt, 0, 5)]
    output = InterferenceProbe().run(
        ProbeBatch(work, parse_params("interference", FAST), tiny_erased_pipe, context(None, tmp_path))
    )
    assert output.extras == [{"erased_concept": "church", "target_concept": "golf_ball"}]
    assert_close(output.images[0], ddim(tiny_erased_pipe, [5], prompt=golf.prompt)[0])


# --------------------------------------------------------------------------- CLI end to end

cli = CliRunner()
TRAJECTORY_PROBES = ["noise_based", "diffusion_completion", "inpainting", "interference"]


def test_engine_run_accepts_each_trajectory_probe_by_name(ray_session, tmp_path):
    fast = {"num_inference_steps": 2, "height": 32, "width": 32}
    run_file = tmp_path / "run.yaml"
    run_file.write_text(
        yaml.safe_dump(
            {
                "output": str(tmp_path / "out"),
                "models": ["tiny-erased", "tiny"],
                "base_model": "tiny",
                "concepts": ["church", "golf_ball"],
                "probes": [
                    {"name": "noise_based", "params": {**fast, "eta_values": [1.0, 1.5], "variance_scales": [1.0]}},
                    {"name": "diffusion_completion", "params": {**fast, "handover_steps": [-1, 0]}},
                    {"name": "inpainting", "params": fast},
                    {"name": "interference", "params": fast},
                ],
                "num_images": 1,
                "torch_threads": 1,
            }
        )
    )
    result = cli.invoke(app, ["run", str(run_file)])
    assert result.exit_code == 0, result.output
    table = read_rows(tmp_path / "out").to_pylist()
    by_probe = {name: [r for r in table if r["probe"] == name] for name in TRAJECTORY_PROBES}
    assert {name: len(r) for name, r in by_probe.items()} == {
        "noise_based": 4,
        "diffusion_completion": 8,
        "inpainting": 4,
        "interference": 4,
    }
    for row in table:
        assert decode_png(row["image"]).shape == (32, 32, 3)
    for row in by_probe["noise_based"]:
        extras = json.loads(row["extras"])
        assert extras["selected_candidate"] in (0, 1) and len(extras["candidate_scores"]) == 2
        assert row["selector"].startswith("clip")
    assert (
        sorted(json.loads(r["extras"])["handover_step"] for r in by_probe["diffusion_completion"]) == [-1] * 4 + [0] * 4
    )
    assert all(r["scoring_region"] == [8, 8, 24, 24] for r in by_probe["inpainting"])
    assert {(r["concept"], r["target_concept"]) for r in by_probe["interference"]} == {
        ("church", "golf_ball"),
        ("golf_ball", "church"),
    }
    # Two erased models x two concepts of inpainting, one reference per (concept, prompt, seed).
    assert len(list((tmp_path / "out" / "cache" / "reference_images").glob("*.png"))) == 2


def test_probes_list_and_describe_show_the_trajectory_probes():
    listing = cli.invoke(app, ["probes", "list"])
    assert listing.exit_code == 0, listing.output
    for name in TRAJECTORY_PROBES:
        assert name in listing.output
    assert "base_model, reference_images" in listing.output
    expected = {
        "noise_based": [
            "eta_values",
            "[1.0, 1.17, 1.34, 1.51, 1.68, 1.85]",
            "variance_scales",
            "[1.0, 1.02, 1.03, 1.04]",
            "selector",
            "keep_all_candidates",
            "candidate_batch_size",
        ],
        "diffusion_completion": ["handover_steps", "[0, 1, 2]", "base_model"],
        "inpainting": ["mask_size", "256", "reference_dir", "paste_context"],
        "interference": ["num_inference_steps", "50", "guidance_scale", "7.5"],
    }
    for name, needles in expected.items():
        described = cli.invoke(app, ["probes", "describe", name])
        assert described.exit_code == 0, described.output
        for needle in needles:
            assert needle in described.output, (name, needle)


def test_noise_control_keeps_candidates_and_noise_but_steps_with_eta_one_v_one(tiny_erased_pipe, tmp_path):
    sweep = {**FAST, "eta_values": [1.0, 2.0], "variance_scales": [1.0, 1.04]}
    probe = NoiseBasedProbe()
    arms = probe.expand_params(parse_params("noise_based", {**sweep, "control": "also"}))
    assert [p.control for p in arms] == ["off", "only"]
    assert arms[0] == parse_params("noise_based", sweep)  # the probe's own rows: as without a control
    treated, control = (run(probe, p, tiny_erased_pipe, None, tmp_path, seeds=(11,)) for p in arms)
    assert len(control.candidates[0]) == len(treated.candidates[0]) == 4  # as many candidates
    # Candidate (eta 1, v 1) is the same trajectory in both; every other control candidate is plain
    # eta-1 DDIM from its own generator, so it differs from the widened-noise one.
    assert_close(control.candidates[0][0], treated.candidates[0][0])
    assert differ(control.candidates[0][1], treated.candidates[0][1]) > 0  # v 1.04 vs 1: a small change
    for index in (2, 3):  # eta 2 vs eta 1
        assert differ(control.candidates[0][index], treated.candidates[0][index]) > 0.5
    assert min(differ(a, b) for i, a in enumerate(control.candidates[0]) for b in control.candidates[0][i + 1:]) > 0.5
    with pytest.raises(UserError, match="its control is the standard_prompt"):
        parse_params("classifier_guidance", {"control": "also"})
