"""Latent classifiers: metrics against hand-computed values, architecture, training on a planted
signal, files that reload to identical logits, label -> concept mapping, and `engine
train-classifier` end to end (two labels, tiny model, images generated through Ray Data)."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from PIL import Image
from typer.testing import CliRunner

from classifier_training import io as classifier_io
from classifier_training.data import evaluation_seeds, resolve_label, training_seeds
from classifier_training.jobs import TrainRequest, plan_jobs
from classifier_training.metrics import pr_auc, roc_auc, roc_curve, tpr_at_fpr
from classifier_training.train import LatentSet, TrainSettings, sample_timesteps, split_train_val, train_classifier
from engine.cli import app
from engine.errors import UserError
from engine.guidance import latent_classifier_io
from engine.guidance.latent_classifier import LatentClassifier
from engine.models.builtin import _sd_scheduler_config
from engine.pipeline.grid import expand_run
from engine.probe import ProbeBatch, ProbeContext
from engine.specs.concepts import load_concept
from engine.specs.runs import RunSpec
from probes.classifier_guidance import ClassifierGuidanceProbe

ALPHAS = DDIMScheduler(**_sd_scheduler_config()).alphas_cumprod


# --------------------------------------------------------------------------- metrics


def test_metrics_match_hand_computed_values():
    labels = [1, 0, 1, 0, 1]
    scores = [0.9, 0.8, 0.7, 0.3, 0.2]
    # Positive-negative pairs ranked correctly: 0.9 beats both negatives, 0.7 beats 0.3, 0.2 none.
    assert roc_auc(labels, scores) == pytest.approx(3 / 6)
    # Precision at each positive (ranks 1, 3, 5): 1/1, 2/3, 3/5; average precision = their mean.
    assert pr_auc(labels, scores) == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    fpr, tpr = roc_curve(labels, scores)
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1, 1])
    np.testing.assert_allclose(tpr, [0, 1 / 3, 1 / 3, 2 / 3, 2 / 3, 1])
    # FPR closest to 5 % is 0, reached with TPR 0 and 1/3: the better threshold counts.
    assert tpr_at_fpr(labels, scores) == pytest.approx(1 / 3)


def test_metrics_with_ties_perfect_separation_and_one_class():
    assert roc_auc([1, 0], [0.5, 0.5]) == pytest.approx(0.5)  # a tie counts one half
    assert pr_auc([1, 0], [0.5, 0.5]) == pytest.approx(0.5)
    assert roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert pr_auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert tpr_at_fpr([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert roc_auc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert math.isnan(roc_auc([1, 1], [0.2, 0.3])) and math.isnan(pr_auc([0, 0], [0.2, 0.3]))
    with pytest.raises(ValueError, match="0 or 1"):
        roc_auc([2, 0], [0.1, 0.2])


def test_roc_auc_equals_the_area_under_the_roc_curve():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    scores = np.round(rng.normal(size=200) + labels, 1)  # rounded: many ties
    fpr, tpr = roc_curve(labels, scores)
    trapezoid = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    assert roc_auc(labels, scores) == pytest.approx(trapezoid)


# --------------------------------------------------------------------------- model


def test_architecture_is_the_originals_for_sd_and_sized_down_for_tiny_latents():
    sd = LatentClassifier((4, 64, 64), ALPHAS)
    assert sd.hidden_size == 1024
    # 16384 -> 1024 (+ 2 -> 1024 time), 1024 -> 512 -> 1: the original's 17.3 M parameters.
    assert sum(p.numel() for p in sd.parameters()) == 16384 * 1024 + 1024 + 2 * 1024 + 1024 + 1024 * 512 + 512 + 513
    tiny = LatentClassifier((4, 32, 32), ALPHAS)
    assert tiny.hidden_size == 256
    assert tiny(torch.randn(3, 4, 32, 32), torch.tensor([0, 500, 999])).shape == (3,)
    encoding = tiny.time_encoding(torch.tensor([0, 999]))
    torch.testing.assert_close(encoding[:, 0], ALPHAS[[0, 999]].sqrt())
    torch.testing.assert_close(encoding[:, 1], (1 - ALPHAS[[0, 999]]).sqrt())
    with pytest.raises(ValueError, match="expects latents of shape"):
        tiny(torch.randn(1, 4, 64, 64), 10)


def test_timesteps_favour_noisy_steps_with_power_three():
    timesteps = sample_timesteps(20000, 1000, 3.0, torch.Generator().manual_seed(0))
    assert int(timesteps.min()) >= 0 and int(timesteps.max()) <= 999
    # u^(1/3) has mean 3/4: t concentrates at the noisy end.
    assert float(timesteps.float().mean()) == pytest.approx(0.75 * 999, rel=0.02)


# --------------------------------------------------------------------------- training and files


def planted_data(n: int = 96, shape=(4, 8, 8)) -> LatentSet:
    """Latents where the concept is a +1 shift of channel 0: learnable through the noise."""
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(n, *shape, generator=generator)
    labels = (torch.arange(n) % 3 == 0).float()
    latents[labels == 1, 0] += 1.0
    return LatentSet(latents, labels)


@pytest.fixture(scope="module")
def trained():
    train, val = split_train_val(planted_data(), 0.25, seed=0)
    settings = TrainSettings(epochs=4, batch_size=8, learning_rate=1e-3, seed=0)
    return train, val, train_classifier(train, val, ALPHAS, settings)


def test_training_on_a_planted_signal_reaches_high_validation_auc(trained):
    train, val, result = trained
    assert val.positives >= 1 and val.negatives >= 1  # stratified split
    assert result.pos_weight == pytest.approx(train.negatives / train.positives)
    assert len(result.history) == 4
    assert result.best_metrics["roc_auc"] > 0.9
    for key in ("train_loss", "val_loss", "roc_auc", "pr_auc", "tpr_at_5_fpr"):
        assert all(math.isfinite(row[key]) for row in result.history)
    # The kept checkpoint is the epoch with the lowest validation loss.
    losses = [row["val_loss"] for row in result.history]
    assert result.best_epoch == int(np.argmin(losses)) + 1


def test_saved_classifier_reloads_to_identical_logits_and_writes_metrics(trained, tmp_path):
    _, val, result = trained
    latent_classifier_io.save_classifier(tmp_path, "church", result.model, {"metrics": result.best_metrics})
    loaded, config = latent_classifier_io.load_classifier(tmp_path, "church")
    x, t = val.latents[:5], torch.tensor([0, 10, 300, 700, 999])
    torch.testing.assert_close(loaded(x, t), result.model.eval()(x, t), rtol=0, atol=0)
    assert config["concept"] == "church" and config["architecture"]["latent_shape"] == [4, 8, 8]
    assert len(config["alphas_cumprod"]) == 1000 and config["metrics"]["roc_auc"] > 0.9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["church.json", "church.safetensors"]

    csv_path, plot_path = classifier_io.write_metrics(tmp_path, "church", result.history)
    with csv_path.open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 and float(rows[0]["roc_auc"]) == pytest.approx(result.history[0]["roc_auc"])
    assert plot_path is not None and Image.open(plot_path).size[0] > 100


def test_a_failing_plot_never_loses_the_metrics(monkeypatch, tmp_path):
    def broken(*args):
        raise RuntimeError("no display")

    monkeypatch.setattr(classifier_io, "_plot", broken)
    csv_path, plot_path = classifier_io.write_metrics(tmp_path, "airliner", [{"epoch": 1, "val_loss": 0.5}])
    assert csv_path.exists() and plot_path is None


# --------------------------------------------------------------------------- labels and requests


@pytest.mark.parametrize(
    "label, concept",
    [
        ("church, church building", "church"),
        ("airliner", "airliner"),
        ("garbage truck, dustcart", "garbage_truck"),
        ("tench, Tinca tinca", "tench"),
        ("English springer, English springer spaniel", "english_springer_spaniel"),
        ("Van Gogh", "van_gogh"),
        ("golf_ball", "golf_ball"),
    ],
)
def test_labels_map_to_concept_slugs(label, concept):
    assert resolve_label(label).name == concept


def test_unknown_label_is_a_user_error():
    with pytest.raises(UserError, match="names no configured concept"):
        resolve_label("cathedral, minster")


def _images(folder, count):
    folder.mkdir(parents=True)
    for i in range(count):
        Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(folder / f"{i}.png")


def test_folder_requests_are_checked_before_any_work(tmp_path):
    _images(tmp_path / "pos" / "church", 2)
    _images(tmp_path / "neg", 3)
    _images(tmp_path / "one", 1)
    model, jobs = plan_jobs(TrainRequest(["church"], model="tiny", positive_dir=tmp_path / "pos",
                                         negative_dir=tmp_path / "neg"))
    assert model.name == "tiny" and jobs[0].positives.folder.endswith("church") and not jobs[0].negative_concepts
    with pytest.raises(UserError, match="one subfolder per concept"):
        plan_jobs(TrainRequest(["church", "airliner"], model="tiny", positive_dir=tmp_path / "pos"))
    with pytest.raises(UserError, match="at least 2 images"):
        plan_jobs(TrainRequest(["church"], model="tiny", positive_dir=tmp_path / "one"))
    with pytest.raises(UserError, match="same concept more than once"):
        plan_jobs(TrainRequest(["church", "church, church building"], model="tiny"))
    with pytest.raises(UserError, match="unknown concept"):
        plan_jobs(TrainRequest(["church"], model="tiny", negative_concepts=["no_such_concept"]))
    # Generated negatives default to every other concept of the same concept set.
    _, jobs = plan_jobs(TrainRequest(["church"], model="tiny"))
    assert "church" not in jobs[0].negative_concepts and "airliner" in jobs[0].negative_concepts


# --------------------------------------------------------------------------- CLI end to end


@pytest.mark.slow
def test_train_classifier_cli_writes_classifiers_that_guidance_finds(ray_session, tiny_pipe, tmp_path):
    output = tmp_path / "my_classifiers"
    result = CliRunner().invoke(app, [
        "train-classifier", "church, church building", "airliner", "--model", "tiny", "--output-dir", str(output),
        "--num-images", "2", "--negative-concept", "picasso", "--num-inference-steps", "2",
        "--epochs", "2", "--batch-size", "2",
    ])
    assert result.exit_code == 0, result.output
    # The names the probes look up: the concept slug, not "church_church_building".
    for concept, label in [("church", "church, church building"), ("airliner", "airliner")]:
        assert (output / f"{concept}.safetensors").is_file() and (output / f"{concept}_metrics.png").is_file()
        config = json.loads((output / f"{concept}.json").read_text())
        assert config["label"] == label and config["architecture"]["latent_shape"] == [4, 32, 32]
        assert config["data"]["train_positive"] + config["data"]["val_positive"] == 2
        assert config["data"]["train_negative"] + config["data"]["val_negative"] == 2  # picasso's images
        assert len(list(csv.DictReader((output / f"{concept}_metrics.csv").open()))) == 2
        assert concept in result.output
        # The generated images' rows are recorded: the concept's training stream, never an evaluated seed.
        rows = config["data"]["training_rows"]
        assert config["data"]["seed_stream"]["name"] == "latent-classifier-training"
        assert rows["positives"]["concept"] == concept and rows["positives"]["prompt"] == load_concept(concept).prompt
        assert rows["positives"]["seeds"] == training_seeds(concept, 2, evaluation_seeds())
        assert rows["negatives"]["picasso"]["seeds"] == training_seeds("picasso", 2, evaluation_seeds())
        assert not set(rows["positives"]["seeds"]) & set(load_concept(concept).seed_list())
        images = sorted(p.name for p in (output / "work" / "images" / "tiny" / concept).glob("*.png"))
        assert images == [f"{i:03d}_seed{seed}.png" for i, seed in enumerate(rows["positives"]["seeds"])]
    assert not (output / "church_church_building.safetensors").exists()
    # Latents were encoded once per image group and cached: church, airliner, picasso.
    assert len(list((output / "work" / "latents").glob("*.safetensors"))) == 3

    # classifier_guidance finds both by concept: the driver's check passes, and the probe guides
    # with the trained classifier of each row's concept.
    spec = RunSpec(output=str(tmp_path / "run"), models=["tiny"], concepts=["church", "airliner"], num_images=1,
                   probes=[{"name": "classifier_guidance", "params": {
                       "classifier_dir": str(output), "classifier_scales": [0.0, 50.0], "num_inference_steps": 2}}],
                   judges=[])
    grid = expand_run(spec)
    probe = ClassifierGuidanceProbe()
    params = probe.params_class.model_validate_json(grid.rows[0].params)
    context = ProbeContext(torch.device("cpu"), lambda: None, load_concept, tmp_path,
                           selector_scores=lambda selector, images, concept, regions: [0.0] * len(images))
    output_rows = probe.run(ProbeBatch(grid.rows, params, tiny_pipe, context))
    for extras in output_rows.extras:
        unguided, guided = extras["candidate_classifier_logits"]
        assert guided > unguided
