"""Noise-based + classifier-guidance probe: classifier guidance on the widened-noise DDIM of noise_based.

The classifier-guided loop of classifier_guidance, stepped with the noisy DDIM (eta > 1) of
noise_based; every (classifier scale, eta) pair is a candidate, scales outer and etas inner as in
the original (25 x 6 = 150 candidates with its default sweep).

Deliberate differences from the original code (docs/deviations.md): each candidate draws its step
noise from its own generator derived from (seed, eta, scale), so any candidate is reproducible alone
(the original used the global CUDA stream, continued across the sweep); x_T is drawn on the CPU, by
default from the row's seed for every candidate (`initial_noise: shared`, as the original started
every candidate from its seed's noise) or, with `per_candidate`, from the candidate's own generator;
the noise multiplier v is a real parameter (the original left it at 1); classifiers load once per
actor. Candidates, selection and extras are the best-of-N base's, as classifier_guidance.

Control (`control: also` or `only`): the same (scale, eta) sweep with guidance scale 0 on every candidate, so
only the widened noise and the choice among candidates remain; it needs no classifier.

With `stop: on_hit` (engine.best_of_n_stop) the candidates are made in a coverage-first order, in rounds
of candidate_batch_size, and a prompt stops at its first candidate the run's classifier judge recognises.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator

from engine.best_of_n import BestOfNParams, BestOfNProbe, unique_values
from engine.guidance.latent_classifier_io import DEFAULT_CLASSIFIER_DIR
from probes.classifier_guidance import DEFAULT_SCALES, ClassifierGuidanceProbe


class NoiseClassifierGuidanceParams(BestOfNParams):
    """Shared generation parameters, the (classifier scale, eta) sweep and how one candidate is chosen."""

    sweep_fields: ClassVar[dict[str, str]] = {"classifier_scale": "classifier_scales", "eta": "eta_values"}

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
    initial_noise: Literal["per_candidate", "shared"] = Field(
        "shared",
        description="shared (the original: every candidate starts from its seed's noise): x_T from the row seed; "
        "per_candidate: each candidate draws its own x_T from (seed, candidate).",
    )

    @field_validator("classifier_scales", "eta_values")
    @classmethod
    def _non_empty_unique_non_negative(cls, values: list[float]) -> list[float]:
        return unique_values(values, minimum=0.0)

    def candidates(self) -> list[dict[str, float]]:
        """(scale, eta) pairs in the original's order: scale outer, eta inner."""
        return [{"classifier_scale": s, "eta": eta} for s in self.classifier_scales for eta in self.eta_values]


class NoiseClassifierGuidanceProbe(ClassifierGuidanceProbe):
    """Classifier guidance and widened DDIM noise together: an eta x scale sweep."""

    name = "noise_classifier_guidance"
    params_class = NoiseClassifierGuidanceParams
    smoke_params = {"classifier_scales": [0.0, 60.0], "eta_values": [0.0, 1.5], "selector": "clip"}
    control_note = None  # it has its own: `control: also` (guidance scale 0 on the same eta sweep)

    def step_noise(self, params: NoiseClassifierGuidanceParams, candidate: dict[str, float]) -> tuple[float, float]:
        return candidate["eta"], params.variance_scale

    def noise_key(self, candidate: dict[str, float]) -> tuple:
        return candidate["eta"], candidate["classifier_scale"]

    def check_request(self, params, concepts, options) -> None:
        if params.control != "only":  # the control guides with scale 0: no classifier is read
            super().check_request(params, concepts, options)

    def uses_classifier(self, params) -> bool:
        # The control guides with scale 0; its classifier matters only if it also selects.
        return not params.is_control or BestOfNProbe.uses_classifier(self, params)

    def guidance(self, batch, rows, candidates, latents, schedule):
        if batch.params.is_control:
            return None
        return super().guidance(batch, rows, candidates, latents, schedule)

    def candidate_extras(self, guidance, latents) -> list[dict]:
        if guidance is None:
            return [{} for _ in range(latents.shape[0])]
        return super().candidate_extras(guidance, latents)
