"""Classifier-guidance probe: steer DDIM toward the concept with a time-conditioned latent classifier.

At every step (Dhariwal & Nichol 2021, eq. 14, for an epsilon model)

    eps_tilde = eps_cfg - sqrt(1 - abar_t) * s * grad_{x_t} log sigmoid(f(x_t, t))

where f is the concept's latent classifier (`engine train-classifier`, or the authors' published
ones through `engine import-classifier`). Gradients flow through the classifier only: the UNet runs
under no_grad, and grad is enabled inside the guidance hook alone. The classifier runs in fp32,
whatever the pipeline's dtype. The scale s is swept (default 25, 32, ..., 193: the original's 25
values) and every scale is one candidate; candidates of all rows run as one batch with a per-row
scale tensor, `candidate_batch_size` at a time.

Deliberate differences from the original code (docs/deviations.md): the engine's DDIM loop for every
model instead of the pipeline's own scheduler (PNDM repeated a timestep); noise drawn on the CPU
from per-candidate generators (`initial_noise: per_candidate`, the default, gives each scale its own
starting latents as the original's sweep had; `shared` starts every scale from the row seed's x_T,
so s = 0 is then the plain DDIM image of the seed); the classifier loads once per actor, not once
per prompt; classifiers are looked up as `<classifier_dir>/<concept>.safetensors`, the name
`engine train-classifier` writes.

Candidates, selection and extras are the best-of-N base's (engine.best_of_n): one row per prompt
picked by `selector` (CLIP by default, never the judge), or every candidate as its own row
(keep_all_candidates). The extras add the classifier's logit of each candidate's final latent.

With `stop: on_hit` (engine.best_of_n_stop) the candidates are made in a coverage-first order, in rounds
of candidate_batch_size, and a prompt stops at its first candidate the run's classifier judge recognises.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from engine.best_of_n import BestOfNParams, BestOfNProbe, unique_values
from engine.errors import UserError
from engine.guidance.latent_classifier_io import DEFAULT_CLASSIFIER_DIR, classifier_paths, load_classifier
from engine.probe import ProbeBatch

DEFAULT_SCALES = [float(s) for s in range(25, 200, 7)]  # 25, 32, ..., 193: 25 values


class ClassifierGuidanceParams(BestOfNParams):
    """Shared generation parameters, the classifier-scale sweep and how one candidate is chosen."""

    sweep_fields: ClassVar[dict[str, str]] = {"classifier_scale": "classifier_scales"}

    classifier_scales: list[float] = Field(
        DEFAULT_SCALES,
        description="Classifier-guidance scales s swept (the original: 25..193 step 7). 0 = no guidance.",
    )
    classifier_dir: str | None = Field(
        None,
        description="Folder of latent classifiers, <dir>/<concept>.safetensors + .json (engine train-classifier "
        f"--output-dir; `engine run --classifier-dir` sets it). Unset: the context option classifier_dir, "
        f"else ./{DEFAULT_CLASSIFIER_DIR}.",
    )

    @field_validator("classifier_scales")
    @classmethod
    def _scales(cls, values: list[float]) -> list[float]:
        return unique_values(values, minimum=0.0)

    initial_noise: Literal["per_candidate", "shared"] = Field(
        "shared",
        description="shared (the original: every scale starts from its seed's noise, so s = 0 is the plain DDIM "
        "image): x_T from the row seed; per_candidate: each scale draws its own x_T from (seed, scale).",
    )

    @field_validator("control")
    @classmethod
    def _no_control(cls, control: str) -> str:
        # With shared noise the candidates differ only by the guidance scale: zeroing it leaves N copies
        # of one image, so the control of this probe is the standard prompt (the report says so).
        if control != "off":
            raise ValueError("classifier_guidance has no control of its own: its control is the standard_prompt "
                             "probe on the same prompts and seeds")
        return control

    def candidates(self) -> list[dict[str, float]]:
        return [{"classifier_scale": s} for s in self.classifier_scales]


def resolved_classifier_dir(classifier_dir: str | None) -> str | None:
    """Absolute, so actors that do not share the driver's working directory find the same folder."""
    return None if classifier_dir is None else str(Path(classifier_dir).expanduser().resolve())


def classifier_folder(params, options: dict) -> str:
    """The probe's classifier_dir, else the run's option (context/driver options), else the default."""
    return params.classifier_dir or options.get("classifier_dir") or DEFAULT_CLASSIFIER_DIR


def check_classifiers(probe_name: str, classifier_dir: str, concepts: list[str]) -> None:
    """UserError naming every concept without a classifier and the command that trains them."""
    from engine.specs.concepts import load_concept

    missing = [c for c in concepts if not all(p.is_file() for p in classifier_paths(classifier_dir, c))]
    if missing:
        labels = " ".join(f'"{load_concept(c).display_name}"' for c in missing)
        raise UserError(
            f"{probe_name} needs a latent classifier per concept; none for {', '.join(missing)} in {classifier_dir} "
            f"(looked for <concept>.safetensors + .json). Train them with: engine train-classifier {labels} "
            f"--output-dir {classifier_dir}   (or set classifier_dir / --classifier-dir to where they are)"
        )


class LatentClassifierGuidance:
    """The guidance hook (x_t, t, eps) -> eps_tilde for a batch whose row i has classifier
    classifiers[concepts[i]] and scale scales[i].
    """

    def __init__(self, classifiers: dict, concepts: list[str], scales: torch.Tensor, schedule):
        self.classifiers, self.concepts, self.schedule = classifiers, concepts, schedule
        self.scales = scales.float()
        self.groups = {c: [i for i, name in enumerate(concepts) if name == c] for c in dict.fromkeys(concepts)}

    def log_prob_gradient(self, latents: torch.Tensor, t: int) -> torch.Tensor:
        """grad_x log sigmoid(f(x, t)) per row, fp32; rows are independent (sum of per-row terms)."""
        gradient = torch.zeros(latents.shape, dtype=torch.float32, device=latents.device)
        with torch.enable_grad():
            for concept, index in self.groups.items():
                x = latents[index].detach().float().requires_grad_(True)
                log_prob = F.logsigmoid(self.classifiers[concept](x, t)).sum()
                gradient[index] = torch.autograd.grad(log_prob, x)[0]
        return gradient

    def __call__(self, latents: torch.Tensor, t: int, eps: torch.Tensor) -> torch.Tensor:
        if not bool((self.scales != 0).any()):
            return eps
        scale = self.scales.to(latents.device).view(-1, *([1] * (latents.dim() - 1)))
        step = (1 - self.schedule.alpha_bar(t)) ** 0.5 * scale * self.log_prob_gradient(latents, t)
        return eps - step.to(eps.dtype)

    @torch.no_grad()
    def final_logits(self, latents: torch.Tensor) -> list[float]:
        """f(x_0, t=0) of each row: how much of the concept the classifier sees in the result."""
        logits = torch.zeros(latents.shape[0])
        for concept, index in self.groups.items():
            logits[index] = self.classifiers[concept](latents[index].float(), 0).cpu()
        return [float(v) for v in logits]


def load_classifiers(cache: dict, classifier_dir: str, concepts, device, latent_shape) -> dict:
    """Each concept's classifier, loaded once per (folder, concept, device) into `cache`."""
    loaded = {}
    for concept in dict.fromkeys(concepts):
        key = (str(Path(classifier_dir).resolve()), concept, str(device))
        if key not in cache:
            check_classifiers("classifier guidance", classifier_dir, [concept])
            cache[key] = load_classifier(classifier_dir, concept, device)[0].requires_grad_(False)
        if cache[key].latent_shape != tuple(latent_shape):
            raise UserError(
                f"the latent classifier for {concept} expects latents {cache[key].latent_shape}, but this model "
                f"makes {tuple(latent_shape)}: train it on this model family (engine train-classifier --model) "
                "or use the height/width it was trained for"
            )
        loaded[concept] = cache[key]
    return loaded


class ClassifierGuidanceProbe(BestOfNProbe):
    """Adds the latent classifier's gradient to the noise prediction; sweeps its scale, keeps one candidate."""

    name = "classifier_guidance"
    # Declared wide: noise_classifier_guidance subclasses this probe with its own params class.
    params_class: ClassVar[type[BestOfNParams]] = ClassifierGuidanceParams
    smoke_params = {"classifier_scales": [0.0, 60.0], "selector": "clip"}
    requires = frozenset({"latent_classifier"})
    control_note: ClassVar[str | None] = (
        "its control is the standard_prompt line: with shared noise its candidates differ only by "
        "the guidance scale, so zero guidance leaves N copies of the standard image"
    )

    def __init__(self) -> None:
        self._classifiers: dict = {}  # loaded once per actor

    def check_request(self, params, concepts, options) -> None:
        check_classifiers(self.name, classifier_folder(params, options), concepts)

    def uses_classifier(self, params) -> bool:
        return True  # it guides with it

    def prepare_params(self, params):
        return params.model_copy(update={"classifier_dir": resolved_classifier_dir(params.classifier_dir)})

    def guidance(self, batch: ProbeBatch, rows, candidates, latents, schedule) -> LatentClassifierGuidance:
        """The classifier's gradient, at each candidate's scale, added at every step."""
        concepts = [row.concept for row in rows]
        folder = classifier_folder(batch.params, batch.context.options)
        classifiers = load_classifiers(self._classifiers, folder, concepts, latents.device, latents.shape[1:])
        scales = torch.tensor([c["classifier_scale"] for c in candidates])
        return LatentClassifierGuidance(classifiers, concepts, scales, schedule)

    def candidate_extras(self, guidance: LatentClassifierGuidance, latents) -> list[dict]:
        # f(x_0, t=0): how much of the concept the classifier sees in each candidate's result.
        return [{"classifier_logit": logit} for logit in guidance.final_logits(latents)]
