"""Noise-based + classifier-guidance probe: classifier guidance on the widened-noise DDIM of noise_based.

Original §3.4: the classifier-guided loop of classifier_guidance, stepped with the noisy DDIM
(eta > 1) of noise_based; every (classifier scale, eta) pair is a candidate, scales outer and etas
inner as in the original (25 x 6 = 150 candidates with its default.yaml).

Fixes against the original (§9.11, §9.20): each candidate draws its step noise from its own
generator derived from (seed, eta, scale), so any candidate is reproducible alone (the original
used the global CUDA stream, shared across the sweep); x_T is the row's seed drawn on the CPU as
standard_prompt draws it; the noise multiplier v is a real parameter (the original left it at 1);
classifiers load once per actor. Candidates, selection and extras follow noise_based.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field, field_validator

from engine import sampling
from engine.best_of_n import BestOfNParams, unique_values
from engine.guidance.latent_classifier_io import DEFAULT_CLASSIFIER_DIR
from engine.probe import Probe, ProbeBatch, ProbeOutput, row_generator
from probes.classifier_guidance import (
    DEFAULT_SCALES,
    LatentClassifierGuidance,
    check_candidate_request,
    check_classifiers,
    classifier_folder,
    conformance_context,  # noqa: F401  (tests/test_probe_conformance.py provides classifiers with it)
    load_classifiers,
    resolved_classifier_dir,
    select_candidates,
)

CONFORMANCE_PARAMS = {
    "classifier_scales": [0.0, 60.0], "eta_values": [0.0, 1.5], "selector": "clip", "height": 32, "width": 32,
}


class NoiseClassifierGuidanceParams(BestOfNParams):
    """Shared generation parameters, the (classifier scale, eta) sweep and how one candidate is chosen."""

    classifier_scales: list[float] = Field(
        DEFAULT_SCALES, description="Classifier-guidance scales s swept (outer loop; the original: 25..193 step 7)."
    )
    eta_values: list[float] = Field(
        [1.0, 1.17, 1.34, 1.51, 1.68, 1.85],
        description="DDIM eta values swept for each scale (inner loop); > 1 widens the noise, as noise_based.",
    )
    variance_scale: float = Field(
        1.0, gt=0, description="Extra multiplier v of the added noise sigma*v*z (the original: 1)."
    )
    classifier_dir: str | None = Field(
        None,
        description="Folder of latent classifiers, <dir>/<concept>.safetensors + .json (engine train-classifier "
        f"--output-dir; `engine run --classifier-dir` sets it). Unset: the context option classifier_dir, "
        f"else ./{DEFAULT_CLASSIFIER_DIR}.",
    )

    @field_validator("classifier_scales", "eta_values")
    @classmethod
    def _non_empty_unique_non_negative(cls, values: list[float]) -> list[float]:
        return unique_values(values, minimum=0.0)

    def candidates(self) -> list[dict[str, float]]:
        """(scale, eta) pairs in the original's order: scale outer, eta inner."""
        return [{"classifier_scale": s, "eta": eta} for s in self.classifier_scales for eta in self.eta_values]


class NoiseClassifierGuidanceProbe(Probe):
    name = "noise_classifier_guidance"
    params_class = NoiseClassifierGuidanceParams
    requires = frozenset({"latent_classifier"})

    def __init__(self):
        self._classifiers: dict = {}  # loaded once per actor

    def check_request(self, params, concepts, options) -> None:
        check_classifiers(self.name, classifier_folder(params, options), concepts)

    def expand_params(self, params: NoiseClassifierGuidanceParams) -> list[NoiseClassifierGuidanceParams]:
        params = params.model_copy(update={"classifier_dir": resolved_classifier_dir(params.classifier_dir)})
        if not params.keep_all_candidates:
            return [params]
        # One row per candidate. Nothing is selected among one candidate, so the selector is 'none'
        # and does not enter the row's identity; expanding twice changes nothing.
        base = params.model_dump()
        return [
            self.params_class.model_validate(
                {**base, "classifier_scales": [c["classifier_scale"]], "eta_values": [c["eta"]], "selector": "none"}
            )
            for c in params.candidates()
        ]

    @torch.no_grad()
    def run(self, batch: ProbeBatch) -> ProbeOutput:
        params: NoiseClassifierGuidanceParams = batch.params
        pipe = batch.pipeline
        candidates = params.candidates()
        check_candidate_request(batch, params, candidates)
        folder = classifier_folder(params, batch.context.options)

        # 1. Every (row, scale, eta) triple, scale outer and eta inner, rows one after another.
        work = [(row, c["classifier_scale"], c["eta"]) for row in batch.rows for c in candidates]
        schedule = sampling.DDIMSchedule.from_pipeline(pipe, params.num_inference_steps)
        images: list[np.ndarray] = []
        logits: list[float] = []
        for start in range(0, len(work), params.candidate_batch_size):
            chunk = work[start : start + params.candidate_batch_size]
            concepts = [row.concept for row, _, _ in chunk]
            # 2. x_T from the row's seed (as standard_prompt); step noise from the candidate's own
            #    generator, derived from (seed, eta, scale).
            embeddings = sampling.encode_prompts(
                pipe, [row.prompt for row, _, _ in chunk], params.negative_prompt, params.guidance_scale
            )
            latents = sampling.initial_latents(
                pipe, [row_generator(row.seed) for row, _, _ in chunk], params.height, params.width
            )
            classifiers = load_classifiers(self._classifiers, folder, concepts, latents.device,
                                           latents.shape[1:])
            # 3. Noisy DDIM with the classifier's gradient added at every step.
            guidance = LatentClassifierGuidance(classifiers, concepts, torch.tensor([s for _, s, _ in chunk]), schedule)
            latents = sampling.denoise(
                pipe,
                latents,
                embeddings,
                schedule,
                params.guidance_scale,
                eta=torch.tensor([eta for _, _, eta in chunk]),
                variance_scale=torch.full((len(chunk),), params.variance_scale),
                generators=[row_generator(row.seed, eta, scale) for row, scale, eta in chunk],
                guidance=guidance,
            )
            # 4. Decode; keep the classifier's logit of the final latent for the extras.
            logits.extend(guidance.final_logits(latents))
            images.extend(sampling.decode(pipe, latents))

        # 5. One row per prompt (selector) or the single candidate.
        return select_candidates(batch, params, candidates, images, logits)
