"""Latent-classifier files: `<dir>/<concept>.safetensors` (weights) + `<concept>.json`.

The JSON holds everything needed to rebuild and judge the classifier: architecture, the
scheduler's alpha-bar table the time encoding indexes, the concept, training settings, data
counts and metrics. File names are the concept slug, exactly what the guidance probes look up
(the original wrote `church_church_building.pt` and then looked for `church.pt`).

Inference side of the latent classifiers (the guidance probes and the selector load from here);
classifier_training writes these files and its metrics beside them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from engine.guidance.latent_classifier import LatentClassifier, build_classifier

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
DEFAULT_CLASSIFIER_DIR = "classifiers"  # `engine train-classifier --output-dir` and the probes' default


def classifier_paths(directory: str | Path, concept: str) -> tuple[Path, Path]:
    """(weights, config) paths of the classifier for `concept` (a concept slug)."""
    directory = Path(directory)
    return directory / f"{concept}.safetensors", directory / f"{concept}.json"


def classifier_exists(directory: str | Path, concept: str) -> bool:
    return all(path.is_file() for path in classifier_paths(directory, concept))


MISSING_CLASSIFIER = "missing"  # the hash of a classifier not trained yet (plans; a run refuses it first)


def classifier_hash(directory: str | Path, concept: str) -> str:
    """A content hash of the concept's classifier (weights and config): what a row made with it
    records, so retraining into the same folder changes the rows' identity."""
    if not classifier_exists(directory, concept):
        return MISSING_CLASSIFIER
    digest = hashlib.sha256()
    for path in classifier_paths(directory, concept):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return "sha256:" + digest.hexdigest()[:16]


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
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
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
