"""Classifier-guidance probe: steer DDIM toward the concept with a time-conditioned latent classifier.

Original §3.3 / §6.4 (Dhariwal & Nichol 2021, eq. 14, for an epsilon model): at every step

    eps_tilde = eps_cfg - sqrt(1 - abar_t) * s * grad_{x_t} log sigmoid(f(x_t, t))

where f is the concept's latent classifier (classifier_training). Gradients flow through the
classifier only: the UNet runs under no_grad, and grad is enabled inside the guidance hook alone.
The classifier runs in fp32, whatever the pipeline's dtype. The scale s is swept (default 25, 32,
..., 193: the original's 25 values) and every scale is one candidate; candidates of all rows run
as one batch with a per-row scale tensor, `candidate_batch_size` at a time.

Fixes against the original (§9.11, §9.12): the engine's DDIM loop (engine.sampling) for every
model instead of the pipeline's own scheduler (PNDM repeated a timestep); x_T is drawn from the
row's seed on the CPU exactly as standard_prompt draws it, so s = 0 is the plain DDIM image of the
same start; the classifier loads once per actor, not once per prompt; classifiers are looked up
as `<classifier_dir>/<concept>.safetensors`, the name `engine train-classifier` writes.

Candidates, selection and extras follow noise_based: one row per prompt picked by `selector`
(never the judge by default, design §4), or every candidate as its own row (keep_all_candidates).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from engine import sampling
from engine.best_of_n import BestOfNParams, select_per_row, unique_values
from engine.errors import UserError
from engine.guidance.latent_classifier_io import DEFAULT_CLASSIFIER_DIR, classifier_paths, load_classifier
from engine.probe import Probe, ProbeBatch, ProbeOutput, row_generator

DEFAULT_SCALES = [float(s) for s in range(25, 200, 7)]  # 25, 32, ..., 193: 25 values

# For tests/test_probe_conformance.py: a fast sweep on the tiny model at 32 px, with untrained
# classifiers of that latent size provided through the context option `classifier_dir`.
CONFORMANCE_PARAMS = {"classifier_scales": [0.0, 60.0], "selector": "clip", "height": 32, "width": 32}


def conformance_context(tmp_path) -> dict:
    """ProbeContext fields that provide the `latent_classifier` requirement: untrained classifiers
    for every configured concept, sized for the tiny model's latents at 32 px."""
    from engine.builtin_models import build_tiny
    from engine.concepts import available_concepts
    from engine.guidance.latent_classifier_io import write_untrained_classifiers

    folder = Path(tmp_path) / "latent-classifiers-32px"
    write_untrained_classifiers(folder, build_tiny(), sorted(available_concepts()), height=32, width=32)
    return {"options": {"classifier_dir": str(folder)}}


class ClassifierGuidanceParams(BestOfNParams):
    """Shared generation parameters, the classifier-scale sweep and how one candidate is chosen."""

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
    from engine.concepts import load_concept

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
    classifiers[concepts[i]] and scale scales[i]."""

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


def check_candidate_request(batch: ProbeBatch, params, candidates: list[dict]) -> None:
    if params.keep_all_candidates and len(candidates) != 1:
        raise ValueError("keep_all_candidates rows hold one candidate each; expand the params first")
    if not params.keep_all_candidates and batch.context.selector_scores is None:
        raise UserError(f"selector {params.selector!r} is not available in this run (no scoring context)")


def select_candidates(batch: ProbeBatch, params, candidates: list[dict], images, logits) -> ProbeOutput:
    """Keep-all rows are their single candidate; otherwise the selector's argmax per row, with every
    candidate handed over for the "mean over all candidates" report (design §4), as noise_based."""
    if params.keep_all_candidates:
        extras = [{**candidates[0], "classifier_logit": logit} for logit in logits]
        return ProbeOutput(images=images, extras=extras)
    per_row = len(candidates)
    out_images, extras, row_candidates = [], [], []
    for index, row_images, chosen, scores in select_per_row(batch, params.selector, images, per_row):
        row_logits = logits[index * per_row : (index + 1) * per_row]
        out_images.append(row_images[chosen])
        row_candidates.append(row_images)
        extras.append({
            "selected_candidate": chosen,
            **candidates[chosen],
            "selector": params.selector,
            "selector_score": scores[chosen],
            "candidate_scores": scores,
            "classifier_logit": row_logits[chosen],  # f(x_0, t=0) of the kept image
            "candidate_classifier_logits": row_logits,
        })
    return ProbeOutput(images=out_images, extras=extras, candidates=row_candidates)


class ClassifierGuidanceProbe(Probe):
    name = "classifier_guidance"
    params_class = ClassifierGuidanceParams
    requires = frozenset({"latent_classifier"})

    def __init__(self):
        self._classifiers: dict = {}  # loaded once per actor

    def check_request(self, params, concepts, options) -> None:
        check_classifiers(self.name, classifier_folder(params, options), concepts)

    def expand_params(self, params: ClassifierGuidanceParams) -> list[ClassifierGuidanceParams]:
        params = params.model_copy(update={"classifier_dir": resolved_classifier_dir(params.classifier_dir)})
        if not params.keep_all_candidates:
            return [params]
        # One row per candidate. Nothing is selected among one candidate, so the selector is 'none'
        # and does not enter the row's identity; expanding twice changes nothing.
        base = params.model_dump()
        return [self.params_class.model_validate({**base, "classifier_scales": [s], "selector": "none"})
                for s in params.classifier_scales]

    @torch.no_grad()
    def run(self, batch: ProbeBatch) -> ProbeOutput:
        params: ClassifierGuidanceParams = batch.params
        pipe = batch.pipeline
        candidates = params.candidates()
        check_candidate_request(batch, params, candidates)
        folder = classifier_folder(params, batch.context.options)

        # 1. Every (row, scale) pair, rows one after another; the classifiers of the batch's concepts.
        work = [(row, c["classifier_scale"]) for row in batch.rows for c in candidates]
        schedule = sampling.DDIMSchedule.from_pipeline(pipe, params.num_inference_steps)
        images: list[np.ndarray] = []
        logits: list[float] = []
        for start in range(0, len(work), params.candidate_batch_size):
            chunk = work[start : start + params.candidate_batch_size]
            # 2. x_T from the row's seed, exactly as standard_prompt draws it.
            embeddings = sampling.encode_prompts(
                pipe, [row.prompt for row, _ in chunk], params.negative_prompt, params.guidance_scale
            )
            latents = sampling.initial_latents(pipe, [row_generator(row.seed) for row, _ in chunk],
                                               params.height, params.width)
            classifiers = load_classifiers(self._classifiers, folder,
                                           [row.concept for row, _ in chunk], latents.device, latents.shape[1:])
            # 3. Deterministic DDIM; the hook adds the classifier's gradient at every step.
            guidance = LatentClassifierGuidance(
                classifiers, [row.concept for row, _ in chunk], torch.tensor([s for _, s in chunk]), schedule
            )
            latents = sampling.denoise(pipe, latents, embeddings, schedule, params.guidance_scale, guidance=guidance)
            # 4. Decode; keep the classifier's logit of the final latent for the extras.
            logits.extend(guidance.final_logits(latents))
            images.extend(sampling.decode(pipe, latents))

        # 5. One row per prompt (selector) or the single candidate.
        return select_candidates(batch, params, candidates, images, logits)
