"""The `latent_classifier` best-of-N selector (engine.scoring.selectors).

A candidate image's score is the concept classifier's logit f(z_0, t=0) of its clean latent
z_0 = VAE mean x scaling_factor, the image resized to the size the classifier was trained for.
The VAE is the one the classifier's latents came from (the model recorded in its JSON by
`engine train-classifier`), so the score lives in the classifier's own latent space; a classifier
without that record (e.g. write_untrained_classifiers) uses the run's base model's VAE.

The folder is the probe context's option `classifier_dir`, else ./classifiers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from PIL import Image

from engine.errors import UserError
from engine.guidance.latent_classifier_io import (
    DEFAULT_CLASSIFIER_DIR,
    classifier_exists,
    classifier_paths,
    load_classifier,
)


@lru_cache(maxsize=4)
def _vae_of(model_json: str, device: str):
    """The VAE of a recorded ModelSpec, loaded once per process."""
    from diffusers import AutoencoderKL

    from engine.models.builtin import BUILTIN_MODELS
    from engine.models.loading import dtype_for
    from engine.specs.runs import ModelSpec

    spec = ModelSpec.model_validate_json(model_json)
    dtype = dtype_for(torch.device(device))
    if spec.pretrained in BUILTIN_MODELS:
        vae = BUILTIN_MODELS[spec.pretrained].build().vae
    else:
        vae = AutoencoderKL.from_pretrained(spec.pretrained, subfolder="vae", revision=spec.revision,
                                            use_safetensors=None if spec.allow_pickle else True)
    return vae.to(device=device, dtype=dtype).eval()



@dataclass
class SelectorModel:
    """A loaded latent-classifier selector: `scores(images)` -> one float per image, higher = more concept."""

    model_id: str
    scores: Callable[[list[np.ndarray]], list[float]]

def latent_classifier_selector(concept, context):
    """engine.scoring.selectors' loader: (ConceptSpec, ProbeContext) -> SelectorModel."""
    folder = context.options.get("classifier_dir") or DEFAULT_CLASSIFIER_DIR
    if not classifier_exists(folder, concept.name):
        raise UserError(
            f"selector latent_classifier: no classifier for {concept.name} in {folder}; train one with: "
            f'engine train-classifier "{concept.display_name}" --output-dir {folder}'
        )
    classifier, config = load_classifier(folder, concept.name, context.device)
    model = config.get("data", {}).get("model")
    if model is not None:
        from engine.specs.runs import ModelSpec

        vae = _vae_of(ModelSpec(**model).model_dump_json(), str(context.device))
    else:
        vae = context.base_pipeline().vae
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    height, width = (side * factor for side in classifier.latent_shape[1:])
    weights, _ = classifier_paths(folder, concept.name)
    model_id = f"latent_classifier:{concept.name}:{hashlib.sha256(weights.read_bytes()).hexdigest()[:12]}"

    @torch.no_grad()
    def scores(images: list[np.ndarray]) -> list[float]:
        if not images:
            return []
        pixels = torch.stack([
            torch.from_numpy(np.asarray(Image.fromarray(image).convert("RGB").resize((width, height),
                                                                                     Image.Resampling.BILINEAR),
                                        dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
            for image in images
        ]).to(vae.device, vae.dtype)
        latents = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
        return [float(v) for v in classifier(latents.float(), 0).cpu()]

    return SelectorModel(model_id=model_id, scores=scores)
