"""Textual-inversion probe: learn a new token for the concept on the erased model, then prompt with it.

One token embedding is learned on the *erased* model from the base model's images of the concept
(diffusers' textual_inversion recipe as the original ran it: 3000 steps, lr 5e-4 scaled by
accumulation 4 to 2e-3, batch 1, AdamW, DDPM noise, object templates for every concept), then the
concept's prompt is generated with the token in place of the concept's name. If the model still
"knows" the concept through another path, the token finds it.

Deliberate differences from the original code (docs/deviations.md): training runs in-process
(probes.textual_inversion_training, no `accelerate launch` subprocess) and is cached by content hash (model
weights, concept, settings, reference images) under the run's cache folder, so each (model,
concept) trains once; the reference images are the engine's base-model images
(engine.sampling.base_reference_images, shared with inpainting) or a folder; the token replaces the
concept's display name or slug wherever it appears, case-insensitively, so multi-word and
capitalised concepts ("english springer spaniel", "Van Gogh") get it too (the original's replace
missed 8 of 13); the shared pipeline's tokenizer and text encoder are never changed. Generation is
the standard probe's (the model's own scheduler, one CPU generator per row), only the prompt
embedding differs. `learnable_property: style` or `auto` (style templates for the artists) are
options, not the default. The training images are the base model's images of the concept's prompt
on seeds of the probe's own stream (`training_seeds: disjoint`, the default: engine.specs.seed_streams,
never a seed any probe evaluates, as the latent classifiers' training images); the original learned
from exactly the evaluation rows' prompts and seeds (`training_seeds: same`).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Literal, cast

import numpy as np
import torch
from PIL import Image
from pydantic import Field

from engine import sampling
from engine.errors import UserError
from engine.probe import Probe, ProbeBatch, ProbeOutput, ProbeParams, WorkRow, row_generator, to_uint8
from engine.specs.concepts import ConceptSpec, load_concept
from engine.specs.seed_streams import stream_seeds
from probes.textual_inversion_training import TextualInversionSettings, encode_with_token, ensure_embedding

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
TRAINING_STREAM = "textual-inversion-training"  # its seed stream (engine.specs.seed_streams)


class TextualInversionParams(ProbeParams):
    """Shared generation parameters, the textual-inversion recipe and where its images come from."""

    placeholder_token: str = Field(
        "<{concept}>", description="The learned token; {concept} becomes the concept slug (the original: <slug>)."
    )
    initializer_token: str = Field(
        "object", description="Word whose embedding starts the token (the original's effective default: object)."
    )
    learnable_property: Literal["object", "style", "auto"] = Field(
        "object",
        description="Training templates: object (the original, for every concept, artists included), style, "
        "or auto = the concept's kind (style templates for the artists).",
    )
    num_reference_images: int = Field(
        30, ge=1, description="Base-model images of the concept to learn from (the original's demo made 30)."
    )
    reference_dir: str | None = Field(
        None, description="Folder of reference images instead of generating them: <dir>/<concept>/ or <dir>/."
    )
    max_train_steps: int = Field(3000, ge=1, description="Optimisation steps (the original: 3000).")
    learning_rate: float = Field(5e-4, gt=0, description="Base learning rate (the original: 5e-4).")
    scale_lr: bool = Field(True, description="Multiply the lr by accumulation x batch (the original: on, 2e-3).")
    train_batch_size: int = Field(1, ge=1, description="Images per micro-batch (the original: 1).")
    gradient_accumulation_steps: int = Field(4, ge=1, description="Micro-batches per step (the original: 4).")
    adam_weight_decay: float = Field(1e-2, ge=0, description="AdamW weight decay (diffusers' default 1e-2).")
    train_seed: int = Field(0, description="Seed of the training draws (images, flips, templates, t, noise).")
    training_seeds: Literal["disjoint", "same"] = Field(
        "disjoint",
        description="Seeds of the base-model images the token learns from: disjoint (a stream of its own, never a "
        "seed any probe evaluates) or same (the concept's first sampled evaluation rows, as the original).",
    )


def concept_names(concept: ConceptSpec) -> list[str]:
    """How the concept may be written in a prompt: display name, slug with spaces, slug."""
    return list(dict.fromkeys([concept.display_name, concept.name.replace("_", " "), concept.name]))


def insert_token(prompt: str, concept: ConceptSpec, token: str) -> str:
    """The prompt with every mention of the concept (any case, whole words) replaced by `token`."""
    for name in sorted(concept_names(concept), key=len, reverse=True):
        pattern = re.compile(rf"(?<!\w){re.escape(name)}(?!\w)", re.IGNORECASE)
        if pattern.search(prompt):
            return pattern.sub(lambda _: token, prompt)
    raise UserError(
        f"textual_inversion: the prompt {prompt!r} of concept {concept.name!r} names it neither as "
        f"{' nor as '.join(repr(n) for n in concept_names(concept))}, so there is no place for the learned token"
    )


def reference_files(reference_dir: str, concept: str) -> list[Path]:
    """The training images found in a reference folder (the concept's subfolder when it has one)."""
    root = Path(reference_dir).expanduser()
    folder = root / concept if (root / concept).is_dir() else root
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


class TextualInversionProbe(Probe[TextualInversionParams]):
    """Learns one token on the erased model from base-model images, then prompts with it."""

    name = "textual_inversion"
    params_class = TextualInversionParams
    smoke_params = {"max_train_steps": 2, "gradient_accumulation_steps": 1, "num_reference_images": 2}
    requires = frozenset({"base_model", "reference_images"})
    sampler = "pipeline"
    role = "recovery"
    needs_base_reference = True
    best_of_n = False
    base_reference = False
    baseline = False

    def base_reference_requests(self, row, concept: ConceptSpec,
                                params: TextualInversionParams) -> list[tuple[str, int]]:
        """The training images: the base model's images of the concept (none with a reference_dir)."""
        if params.reference_dir is not None:
            return []
        return [(row.prompt, row.seed) for row in self.reference_rows(params, concept)]

    def training_passes(self, params: TextualInversionParams) -> int:
        return params.max_train_steps * params.gradient_accumulation_steps * params.train_batch_size

    def settings(self, params: TextualInversionParams, concept: ConceptSpec) -> TextualInversionSettings:
        kind = concept.kind if params.learnable_property == "auto" else params.learnable_property
        try:
            token = params.placeholder_token.format(concept=concept.name)
        except (KeyError, IndexError, ValueError):
            raise UserError(
                f"textual_inversion placeholder_token {params.placeholder_token!r}: only {{concept}} may be in braces"
            ) from None
        return TextualInversionSettings(
            placeholder_token=token,
            initializer_token=params.initializer_token,
            learnable_property=kind,
            max_train_steps=params.max_train_steps,
            learning_rate=params.learning_rate,
            scale_lr=params.scale_lr,
            train_batch_size=params.train_batch_size,
            gradient_accumulation_steps=params.gradient_accumulation_steps,
            adam_weight_decay=params.adam_weight_decay,
            resolution=params.height if params.height == params.width else None,
            seed=params.train_seed,
        )

    def check_request(self, params, concepts, options) -> None:
        if params.reference_dir is not None and not Path(params.reference_dir).expanduser().is_dir():
            raise UserError(f"textual_inversion reference_dir not found: {params.reference_dir}")
        for name in concepts:
            concept = load_concept(name)
            token = self.settings(params, concept).placeholder_token
            if not token.strip() or " " in token:
                raise UserError(f"textual_inversion placeholder_token must be one word, got {token!r}")
            insert_token(concept.prompt, concept, token)  # UserError if the concept is not in its prompt
            if params.reference_dir is not None and not reference_files(params.reference_dir, name):
                raise UserError(f"textual_inversion: no reference images for {name} in {params.reference_dir}")

    def references(self, batch: ProbeBatch, concept: ConceptSpec) -> tuple[list[np.ndarray], list[str]]:
        """The concept's reference images and a content key for each."""
        params: TextualInversionParams = batch.params
        if params.reference_dir is not None:
            paths = reference_files(params.reference_dir, concept.name)
            images = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
            return images, [hashlib.sha256(p.read_bytes()).hexdigest()[:32] for p in paths]
        return sampling.base_reference_images(batch.context, self.reference_rows(params, concept), params)

    @staticmethod
    def reference_rows(params: TextualInversionParams, concept: ConceptSpec) -> list[WorkRow]:
        """The rows whose base-model images the token learns from: the concept's prompt on the probe's
        own seed stream (disjoint from every evaluated seed), or with `same` the concept's first sampled rows.
        """
        if params.training_seeds == "same":
            rows = concept.sample_prompts(params.num_reference_images)
        else:
            seeds = stream_seeds(TRAINING_STREAM, concept.name, params.num_reference_images)
            rows = [(index, concept.prompt, seed) for index, seed in enumerate(seeds)]
        return [WorkRow("", "", "", concept.name, concept.name, "reference", "", prompt, index, seed)
                for index, prompt, seed in rows]

    @torch.no_grad()
    def run(self, batch: ProbeBatch) -> ProbeOutput:
        params: TextualInversionParams = batch.params
        pipe = batch.pipeline
        concepts = {name: batch.context.concept(name) or load_concept(name) for name in dict.fromkeys(
            row.concept for row in batch.rows)}

        # 1. One learned embedding per concept of the batch: from the cache, or trained now on the
        #    erased model (gradients enabled inside the trainer only).
        embeddings = {}
        for name, concept in concepts.items():
            images, keys = self.references(batch, concept)
            with torch.enable_grad():
                embeddings[name] = ensure_embedding(
                    pipe, name, images, keys, self.settings(params, concept),
                    sampling.weights_fingerprint(pipe), batch.context.cache_dir,
                )

        # 2. The token in place of the concept's name in each row's prompt.
        prompts = [insert_token(row.prompt, concepts[row.concept], embeddings[row.concept].token)
                   for row in batch.rows]

        # 3. Prompt embeddings with the learned vector, one call per concept (the shared text
        #    encoder is restored after each).
        row_embeds: list[torch.Tensor | None] = [None] * len(batch.rows)
        for name, embedding in embeddings.items():
            index = [i for i, row in enumerate(batch.rows) if row.concept == name]
            encoded = encode_with_token(pipe, [prompts[i] for i in index], embedding.token, embedding.vector)
            for i, tensor in zip(index, encoded, strict=False):
                row_embeds[i] = tensor
        # Every row's concept is one of `concepts`, so every entry was filled above.
        prompt_embeds = torch.stack(cast(list[torch.Tensor], row_embeds))

        # 4. The standard probe's generation: the model's scheduler, one CPU generator per row.
        result = pipe(
            prompt_embeds=prompt_embeds,
            negative_prompt=[params.negative_prompt] * len(batch.rows) if params.negative_prompt else None,
            num_inference_steps=params.num_inference_steps,
            guidance_scale=params.guidance_scale,
            height=params.height,
            width=params.width,
            generator=[row_generator(row.seed) for row in batch.rows],
            output_type="np",
        )
        extras = []
        for row, prompt in zip(batch.rows, prompts, strict=False):
            embedding = embeddings[row.concept]
            extras.append({
                "ti_prompt": prompt,
                "placeholder_token": embedding.token,
                "embedding_key": embedding.key,
                "embedding_trained_now": embedding.trained_now,
                # The loss on fixed draws before and after training: did the token learn anything?
                "ti_loss_initial": embedding.info["fixed_draw_loss_initial"],
                "ti_loss_final": embedding.info["fixed_draw_loss_final"],
            })
        return ProbeOutput(images=to_uint8(result.images), extras=extras)
