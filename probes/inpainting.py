"""Inpainting probe: the erased model repaints the centre of the base model's image of the concept.

As the original: the base model's image for the same prompt and seed is the visual context; a centre
square (256 of 512 px by default, scaled by side/512 for other sizes) is masked and repainted by
diffusers' StableDiffusionInpaintPipeline built from the erased pipeline's components. With SD's
4-channel UNet this is the standard latent-blending path: strength 1 (the masked area starts from
noise), the model's own scheduler, and after every step the unmasked latents are replaced by the
reference's latents noised to the next timestep. The scoring region is the mask.

Deliberate differences from the original code (docs/deviations.md): the mask size is a real parameter, the mask is
exactly `mask_size` px (PIL drew 257) and aligned to the VAE's latent grid; references are made by
the engine (once per base model, concept, prompt and seed, cached by content hash and shared by
every erased model of a grid) or read from `reference_dir`. The erased pipeline's own text
encoder encodes the prompt (for a UNet-only model that is the base model's, as in the original).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pydantic import Field

from engine import sampling
from engine.errors import UserError
from engine.probe import Probe, ProbeBatch, ProbeOutput, ProbeParams, row_generator, to_uint8

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
SEED_IN_NAME = re.compile(r"seed(\d+)")


class InpaintingParams(ProbeParams):
    """Shared generation parameters plus the mask and where the reference images come from."""

    mask_size: int = Field(
        256, ge=8, le=512, description="Side of the centre square mask at 512 px; scaled by side/512 for other sizes."
    )
    reference_dir: str | None = Field(
        None,
        description="Folder of reference images instead of generating them with the base model: "
        "<dir>/<concept>/ or <dir>/, files named *seed<SEED>.png (the original's names) or one image for all.",
    )
    paste_context: bool = Field(
        True,
        description="Paste the reference's unmasked pixels over the output (diffusers' apply_overlay), so only "
        "the mask is the erased model's work; false keeps the VAE-decoded frame, as the original.",
    )


def reference_folder(reference_dir: str, concept: str) -> Path:
    """The concept's subfolder of a reference folder when it has one, else the folder itself."""
    root = Path(reference_dir).expanduser()
    return root / concept if (root / concept).is_dir() else root


def find_reference(folder: Path, seed: int) -> Path:
    """The image named for `seed` (the original's `<concept>_<i>_seed<seed>.png`), or the folder's
    only image. Raises UserError otherwise.
    """
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    matches = [p for p in images if str(seed) in SEED_IN_NAME.findall(p.stem)]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise UserError(f"{folder}: several images for seed {seed}: {', '.join(p.name for p in matches)}")
    if len(images) == 1:
        return images[0]
    raise UserError(f"{folder}: no reference image for seed {seed}; name files *seed{seed}.png or leave a single image")


def mask_box(height: int, width: int, mask_size: int, latent_factor: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the centre square, side = mask_size/512 of the shorter image
    side, snapped to the latent grid so the latent mask is exact.
    """
    side = round(min(height, width) * mask_size / 512 / latent_factor) * latent_factor
    side = max(latent_factor, side)
    left = (width - side) // 2 // latent_factor * latent_factor
    top = (height - side) // 2 // latent_factor * latent_factor
    return left, top, left + side, top + side


class InpaintingProbe(Probe[InpaintingParams]):
    """The erased model repaints a centre square of the base model's image of the same prompt and seed."""

    name = "inpainting"
    params_class = InpaintingParams
    smoke_params = {}
    requires = frozenset({"base_model", "reference_images"})
    sampler = "pipeline"
    role = "recovery"
    needs_base_reference = True
    best_of_n = False
    base_reference = True
    baseline = False

    def base_reference_requests(self, row, concept, params: InpaintingParams) -> list[tuple[str, int]]:
        """The context: the base model's image of the row's own prompt and seed (none with a reference_dir)."""
        return [] if params.reference_dir is not None else [(row.prompt, row.seed)]

    def check_request(self, params: InpaintingParams, concepts: list[str], options) -> None:
        if params.reference_dir is not None and not Path(params.reference_dir).expanduser().is_dir():
            raise UserError(f"inpainting reference_dir not found: {params.reference_dir}")

    def work_prompts(self, concept, concepts, num_images: int, params: InpaintingParams):
        rows = super().work_prompts(concept, concepts, num_images, params)
        if params.reference_dir is not None:  # every row's image must exist before any work starts
            folder = reference_folder(params.reference_dir, concept.name)
            for _, _, _, seed in rows:
                find_reference(folder, seed)
        return rows

    @torch.no_grad()
    def run(self, batch: ProbeBatch) -> ProbeOutput:
        params: InpaintingParams = batch.params
        pipe = batch.pipeline
        height = params.height or pipe.unet.config.sample_size * pipe.vae_scale_factor
        width = params.width or pipe.unet.config.sample_size * pipe.vae_scale_factor

        # 1. Reference images: a user's folder, or the base model's image of the same prompt and
        #    seed, made once and cached on disk for every erased model of the grid.
        if params.reference_dir is not None:
            paths = [find_reference(reference_folder(params.reference_dir, r.concept), r.seed) for r in batch.rows]
            references = [_load_rgb(path, width, height) for path in paths]
            sources = [str(path) for path in paths]
        else:
            references, keys = sampling.base_reference_images(batch.context, batch.rows, params)
            references = [_fit(image, width, height) for image in references]
            sources = [f"cache:{key}" for key in keys]

        # 2. The centre square mask (white = repaint), aligned to the latent grid.
        box = mask_box(height, width, params.mask_size, pipe.vae_scale_factor)
        mask = np.zeros((height, width), dtype=np.uint8)
        mask[box[1] : box[3], box[0] : box[2]] = 255

        # 3. An inpainting pipeline over the erased pipeline's components. The scheduler is a fresh
        #    copy (the pipeline rewrites outdated scheduler configs in place); the UNet config it may
        #    rewrite for old checkpoints is restored below, so shared components stay untouched.
        from diffusers import StableDiffusionInpaintPipeline  # here: listing or planning probes stays light

        unet_config = pipe.unet._internal_dict
        try:
            inpaint = StableDiffusionInpaintPipeline(
                vae=pipe.vae,
                text_encoder=pipe.text_encoder,
                tokenizer=pipe.tokenizer,
                unet=pipe.unet,
                scheduler=type(pipe.scheduler).from_config(pipe.scheduler.config),
                safety_checker=None,
                feature_extractor=None,
                image_encoder=None,
                requires_safety_checker=False,
            )
            inpaint.set_progress_bar_config(disable=True)

            # 4. Repaint: strength 1, one generator per row from its seed.
            result = inpaint(
                prompt=batch.prompts,
                negative_prompt=[params.negative_prompt] * len(batch.rows) if params.negative_prompt else None,
                image=[Image.fromarray(image) for image in references],
                mask_image=[Image.fromarray(mask)] * len(batch.rows),
                height=height,
                width=width,
                num_inference_steps=params.num_inference_steps,
                guidance_scale=params.guidance_scale,
                generator=[row_generator(seed) for seed in batch.seeds],
                output_type="np",
            )
        finally:
            pipe.unet._internal_dict = unet_config
        images = to_uint8(result.images)

        # 5. Optionally put the exact reference pixels back outside the mask.
        if params.paste_context:
            outside = mask == 0
            for image, reference in zip(images, references, strict=False):
                image[outside] = reference[outside]
        extras = [{"reference": source, "mask_box": list(box)} for source in sources]
        return ProbeOutput(images=images, extras=extras, scoring_regions=[box] * len(batch.rows))


def _load_rgb(path: Path, width: int, height: int) -> np.ndarray:
    with Image.open(path) as image:
        return _fit(np.asarray(image.convert("RGB")), width, height)


def _fit(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize to the generation size (LANCZOS, as the notebook resized its base image)."""
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.LANCZOS))
