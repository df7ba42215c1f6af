"""classifier_guidance and noise_classifier_guidance on the tiny model with untrained latent
classifiers: guidance raises the classifier's logit, s = 0 is plain DDIM, candidates reproduce
alone, the hook is eps - sqrt(1 - abar_t) s grad log sigmoid(f), and a missing classifier is a
UserError before any work."""

from __future__ import annotations

from typing import get_args

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from engine import sampling
from engine.cli import app
from engine.errors import UserError
from engine.guidance.latent_classifier_io import load_classifier, write_untrained_classifiers
from engine.pipeline.grid import expand_run
from engine.probe import ProbeBatch, ProbeContext, WorkRow, row_generator
from engine.specs.concepts import load_concept
from engine.specs.runs import RunSpec
from probes.classifier_guidance import ClassifierGuidanceParams, ClassifierGuidanceProbe, LatentClassifierGuidance
from probes.noise_classifier_guidance import NoiseClassifierGuidanceParams, NoiseClassifierGuidanceProbe

STEPS = 4
SIZE = {"height": 32, "width": 32}  # latents 4x16x16: a quarter of the tiny model's native cost
PROMPT = "a picture of a church"
TOLERANCE = 2  # uint8 levels: a candidate alone and inside a batch may round differently


def brightness(selector, images, concept, regions):
    return [float(np.asarray(image, dtype=np.float64).mean()) for image in images]


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory, tiny_pipe):
    folder = tmp_path_factory.mktemp("classifiers")
    write_untrained_classifiers(folder, tiny_pipe, ["church", "golf_ball"], seed=3, **SIZE)
    return folder


def _rows(seeds, concept="church", prompt=PROMPT):
    return [WorkRow(f"r{s}", "tiny", "none", concept, concept, "cg", "{}", prompt, i, s) for i, s in enumerate(seeds)]


def _run(probe, params, pipe, rows, tmp_path):
    context = ProbeContext(torch.device("cpu"), lambda: pipe, load_concept, tmp_path, selector_scores=brightness)
    return probe.run(ProbeBatch(rows, params, pipe, context))


def test_guidance_raises_the_classifiers_logit_of_the_final_latent(tiny_pipe, classifier_dir, tmp_path):
    params = ClassifierGuidanceParams(classifier_scales=[0.0, 40.0, 120.0], classifier_dir=str(classifier_dir),
                                      num_inference_steps=STEPS, **SIZE)
    output = _run(ClassifierGuidanceProbe(), params, tiny_pipe, _rows([7]), tmp_path)
    for extras, candidates in zip(output.extras, output.candidates, strict=False):
        unguided, mild, strong = extras["candidate_classifier_logits"]
        assert unguided < mild < strong  # same seed, same x_T: only the guidance differs
        assert len(candidates) == 3 and extras["selected_candidate"] == int(np.argmax(extras["candidate_scores"]))
        assert extras["classifier_scale"] == [0.0, 40.0, 120.0][extras["selected_candidate"]]


def test_scale_zero_is_the_plain_ddim_image_of_the_same_seed(tiny_pipe, classifier_dir, tmp_path):
    probe = ClassifierGuidanceProbe()
    [params] = probe.expand_params(ClassifierGuidanceParams(
        classifier_scales=[0.0], keep_all_candidates=True, classifier_dir=str(classifier_dir),
        num_inference_steps=STEPS, **SIZE))
    image = _run(probe, params, tiny_pipe, _rows([1233]), tmp_path).images[0]
    plain = sampling.generate(tiny_pipe, [PROMPT], [row_generator(1233)], STEPS, params.guidance_scale, **SIZE)[0]
    np.testing.assert_array_equal(image, plain)


def test_hook_is_eps_minus_scaled_gradient_and_rows_are_independent(tiny_pipe, classifier_dir):
    classifiers = {c: load_classifier(classifier_dir, c)[0] for c in ("church", "golf_ball")}
    schedule = sampling.DDIMSchedule.from_pipeline(tiny_pipe, STEPS)
    t = schedule.timesteps[1]
    x = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    scales = torch.tensor([0.0, 10.0, 30.0])
    hook = LatentClassifierGuidance(classifiers, ["church", "golf_ball", "church"], scales, schedule)
    guided = hook(x, t, eps)
    for i, concept in enumerate(["church", "golf_ball", "church"]):
        xi = x[i : i + 1].clone().requires_grad_(True)
        (gradient,) = torch.autograd.grad(torch.nn.functional.logsigmoid(classifiers[concept](xi, t)).sum(), xi)
        expected = eps[i] - (1 - schedule.alpha_bar(t)) ** 0.5 * scales[i] * gradient[0]
        torch.testing.assert_close(guided[i], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(guided[0], eps[0], rtol=0, atol=0)  # s = 0 leaves eps untouched


def test_noise_guidance_candidates_reproduce_alone(tiny_pipe, classifier_dir, tmp_path):
    probe = NoiseClassifierGuidanceProbe()
    sweep = NoiseClassifierGuidanceParams(classifier_scales=[0.0, 60.0], eta_values=[0.0, 1.5],
                                          classifier_dir=str(classifier_dir), num_inference_steps=STEPS, **SIZE)
    output = _run(probe, sweep, tiny_pipe, _rows([11]), tmp_path)
    candidates = output.candidates[0]
    assert [(c["classifier_scale"], c["eta"]) for c in sweep.candidates()] == [(0, 0), (0, 1.5), (60, 0), (60, 1.5)]
    assert not np.array_equal(candidates[0], candidates[1])  # eta 1.5 really adds noise
    expanded = probe.expand_params(sweep.model_copy(update={"keep_all_candidates": True, "selector": "none"}))
    assert len(expanded) == 4
    for index in (1, 3):  # the stochastic candidates: their step noise comes from (seed, eta, scale)
        params, in_sweep = expanded[index], candidates[index]
        alone = _run(probe, params, tiny_pipe, _rows([11]), tmp_path)
        assert np.abs(alone.images[0].astype(int) - in_sweep.astype(int)).max() <= TOLERANCE
    # eta = 0 and s = 0: plain DDIM from the standard probe's x_T.
    plain = sampling.generate(tiny_pipe, [PROMPT], [row_generator(11)], STEPS, sweep.guidance_scale, **SIZE)[0]
    assert np.abs(candidates[0].astype(int) - plain.astype(int)).max() <= TOLERANCE
    logits = output.extras[0]["candidate_classifier_logits"]
    assert logits[2] > logits[0]  # guidance at eta 0 raises the logit


def test_default_sweep_is_the_originals_25_scales():
    assert ClassifierGuidanceParams().classifier_scales == [float(s) for s in range(25, 194, 7)]
    assert len(ClassifierGuidanceParams().classifier_scales) == 25
    assert len(NoiseClassifierGuidanceParams().candidates()) == 25 * 6


@pytest.mark.parametrize("params_class", [ClassifierGuidanceParams, NoiseClassifierGuidanceParams])
def test_selector_names_are_the_engines(params_class):
    from engine.scoring.selectors import SELECTOR_NAMES

    assert set(get_args(params_class.model_fields["selector"].annotation)) == set(SELECTOR_NAMES)


def _spec(tmp_path, probe, params):
    return RunSpec(output=str(tmp_path / "out"), models=["tiny"], concepts=["church", "golf_ball"],
                   probes=[{"name": probe, "params": params}], num_images=1, judges=[])


@pytest.mark.parametrize("probe", ["classifier_guidance", "noise_classifier_guidance"])
def test_missing_classifier_is_a_user_error_before_any_work(probe, tmp_path, classifier_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError) as error:
        expand_run(_spec(tmp_path, probe, {"classifier_dir": str(empty)}))
    message = str(error.value)
    assert 'engine train-classifier "church" "golf ball" --output-dir' in message and str(empty) in message
    assert not (tmp_path / "out").exists()
    grid = expand_run(_spec(tmp_path, probe, {"classifier_dir": str(classifier_dir)}))
    assert len(grid.rows) == 2 and all(str(classifier_dir) in row.params for row in grid.rows)


def test_run_cli_classifier_dir_flag_reaches_the_probe_check(tmp_path):
    runner = CliRunner()
    args = ["run", "--model", "tiny", "--concept", "church", "--num-images", "1", "--output", str(tmp_path / "o")]
    result = runner.invoke(app, [*args, "--probe", "classifier_guidance", "--classifier-dir", str(tmp_path)])
    assert result.exit_code == 2 and "engine train-classifier" in result.output
    result = runner.invoke(app, [*args, "--probe", "standard_prompt", "--classifier-dir", str(tmp_path)])
    assert result.exit_code == 2 and "no probe of this run uses latent classifiers" in result.output
    assert not (tmp_path / "o").exists()


def test_classifier_of_another_latent_size_is_a_clear_error(tiny_pipe, classifier_dir, tmp_path):
    params = ClassifierGuidanceParams(classifier_scales=[10.0], keep_all_candidates=True,
                                      classifier_dir=str(classifier_dir), num_inference_steps=STEPS)  # native 64 px
    with pytest.raises(UserError, match=r"expects latents \(4, 16, 16\).*makes \(4, 32, 32\)"):
        _run(ClassifierGuidanceProbe(), params, tiny_pipe, _rows([1]), tmp_path)


def test_latent_classifier_selector_scores_candidates_with_the_concepts_classifier(tiny_pipe, classifier_dir,
                                                                                   monkeypatch, tmp_path):
    """The latent_classifier selector: one logit per image,
    f(VAE mean latent, t=0), the image resized to the classifier's training size."""
    from engine.scoring import selectors

    context = ProbeContext(torch.device("cpu"), lambda: tiny_pipe, load_concept, tmp_path,
                           options={"classifier_dir": str(classifier_dir)})
    bank = selectors.SelectorBank([], {"church": load_concept("church")}, torch.device("cpu"), lambda: context)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(2)]
    scores = bank.scores("latent_classifier", images, "church")
    classifier = load_classifier(classifier_dir, "church")[0]
    with torch.no_grad():
        for image, score in zip(images, scores, strict=False):
            small = torch.from_numpy(np.asarray(Image.fromarray(image).resize((32, 32), Image.BILINEAR),
                                                dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
            latent = tiny_pipe.vae.encode(small).latent_dist.mean * tiny_pipe.vae.config.scaling_factor
            assert score == pytest.approx(float(classifier(latent, 0)), abs=1e-5)
    assert bank.take_used()["church"].startswith("latent_classifier=latent_classifier:church:")
    context.options["classifier_dir"] = str(tmp_path)  # no classifier there
    fresh = selectors.SelectorBank([], {"church": load_concept("church")}, torch.device("cpu"), lambda: context)
    with pytest.raises(UserError, match='engine train-classifier "church"'):
        fresh.scores("latent_classifier", images, "church")
