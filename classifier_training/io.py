"""Save and load latent classifiers: `<dir>/<concept>.safetensors` (weights) + `<concept>.json`.

The JSON holds everything needed to rebuild and judge the classifier: architecture, the
scheduler's alpha-bar table the time encoding indexes, the concept, training settings, data
counts and metrics. File names are the concept slug, exactly what the guidance probes look up
(the original wrote `church_church_building.pt` and then looked for `church.pt`).

The metrics CSV and plot are written after training; the CSV first, and a failing plot only logs
a warning (the original crashed here and lost the run's bookkeeping).
"""

from __future__ import annotations

import csv
import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from classifier_training.model import LatentClassifier, build_classifier

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
DEFAULT_CLASSIFIER_DIR = "classifiers"  # `engine train-classifier --output-dir` and the probes' default


def classifier_paths(directory: str | Path, concept: str) -> tuple[Path, Path]:
    """(weights, config) paths of the classifier for `concept` (a concept slug)."""
    directory = Path(directory)
    return directory / f"{concept}.safetensors", directory / f"{concept}.json"


def classifier_exists(directory: str | Path, concept: str) -> bool:
    return all(path.is_file() for path in classifier_paths(directory, concept))


def save_classifier(directory: str | Path, concept: str, model: LatentClassifier, info: dict[str, Any]) -> Path:
    """Write weights and config; `info` (concept, training, metrics, data...) goes into the JSON."""
    weights, config_path = classifier_paths(directory, concept)
    weights.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    config = {
        "format_version": FORMAT_VERSION,
        "concept": concept,
        "architecture": model.architecture(),
        "alphas_cumprod": [float(a) for a in model.alphas_cumprod.cpu()],
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **info,
    }
    # Temporary names then rename: a reader never sees half a classifier.
    tmp_weights, tmp_config = weights.with_suffix(".safetensors.tmp"), config_path.with_suffix(".json.tmp")
    save_file(state, str(tmp_weights), metadata={"concept": concept, "format_version": str(FORMAT_VERSION)})
    tmp_config.write_text(json.dumps(config, indent=2, sort_keys=True, default=float))
    tmp_weights.replace(weights)
    tmp_config.replace(config_path)
    return weights


def load_classifier(
    directory: str | Path, concept: str, device: torch.device | str = "cpu"
) -> tuple[LatentClassifier, dict[str, Any]]:
    """The classifier for `concept` in eval mode, and its config."""
    weights, config_path = classifier_paths(directory, concept)
    if not weights.is_file() or not config_path.is_file():
        raise FileNotFoundError(
            f"no latent classifier for {concept!r} in {directory} ({weights.name} + {config_path.name})"
        )
    config = json.loads(config_path.read_text())
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{config_path}: unsupported format_version {config.get('format_version')!r}")
    model = build_classifier(config["architecture"], config["alphas_cumprod"])
    model.load_state_dict(load_file(str(weights)), strict=True)
    return model.to(device).eval(), config


def write_metrics(directory: str | Path, concept: str, history: list[dict[str, float]]) -> tuple[Path, Path | None]:
    """`<concept>_metrics.csv` and `<concept>_metrics.png` (loss and validation metrics per epoch).
    Returns the paths; the plot path is None when plotting failed (logged, never raised)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    csv_path = directory / f"{concept}_metrics.csv"
    columns = list(history[0]) if history else ["epoch"]
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(history)
    plot_path = directory / f"{concept}_metrics.png"
    try:
        _plot(history, concept, plot_path)
    except Exception as exc:  # bookkeeping must never lose a trained classifier
        logger.warning("could not draw %s: %s", plot_path, exc)
        return csv_path, None
    return csv_path, plot_path


def _plot(history: list[dict[str, float]], concept: str, path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, safe in Ray workers

    epochs = [row["epoch"] for row in history]
    figure = Figure(figsize=(10, 4), dpi=100)
    losses, ranking = figure.subplots(1, 2)
    for key in ("train_loss", "val_loss"):
        losses.plot(epochs, [row[key] for row in history], marker=".", label=key)
    losses.set(xlabel="epoch", ylabel="weighted BCE", title=f"{concept}: loss")
    losses.legend()
    for key in ("roc_auc", "pr_auc", "tpr_at_5_fpr"):
        ranking.plot(epochs, [row[key] for row in history], marker=".", label=key)
    ranking.set(xlabel="epoch", ylim=(0, 1.02), title=f"{concept}: validation")
    ranking.legend()
    figure.tight_layout()
    figure.savefig(path)


def write_untrained_classifiers(
    directory: str | Path, pipe, concepts: list[str], seed: int = 0, height: int | None = None,
    width: int | None = None,
) -> list[Path]:
    """Randomly initialised classifiers sized for `pipe`'s latents at height x width (default: its
    native size), one per concept: lets tests and smoke runs exercise the guidance probes without
    training (their guidance steers toward nothing in particular)."""
    from diffusers import DDIMScheduler

    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    latent_shape = (pipe.unet.config.in_channels, (height or native) // pipe.vae_scale_factor,
                    (width or native) // pipe.vae_scale_factor)
    alphas_cumprod = DDIMScheduler.from_config(pipe.scheduler.config).alphas_cumprod
    paths = []
    for index, concept in enumerate(concepts):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + index)
            model = LatentClassifier(latent_shape, alphas_cumprod)
        paths.append(save_classifier(directory, concept, model.eval(), {"untrained": True, "seed": seed + index}))
    return paths
