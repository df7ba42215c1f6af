"""The probe interface: typed params, batch and output types, and the explicit lazy registry.

A probe is one class in one file of `probes/`. It receives a ProbeBatch (rows that share model,
probe and params) and returns a ProbeOutput with one uint8 image per row. Registration is a
name -> "module:Class" mapping, so listing probes imports nothing heavy; this module itself imports
torch only when a generator is made, so validating a run config stays light.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from engine.errors import UserError, format_validation_error, unknown_choice

if TYPE_CHECKING:
    import torch

    from engine.specs.concepts import ConceptSpec

# Adding a probe: its file in probes/, one line here, its test.
PROBE_REGISTRY: dict[str, str] = {
    "standard_prompt": "probes.standard_prompt:StandardPromptProbe",
    "noise_based": "probes.noise_based:NoiseBasedProbe",
    "diffusion_completion": "probes.diffusion_completion:DiffusionCompletionProbe",
    "inpainting": "probes.inpainting:InpaintingProbe",
    "interference": "probes.interference:InterferenceProbe",
    "classifier_guidance": "probes.classifier_guidance:ClassifierGuidanceProbe",
    "noise_classifier_guidance": "probes.noise_classifier_guidance:NoiseClassifierGuidanceProbe",
    "textual_inversion": "probes.textual_inversion:TextualInversionProbe",
    "adversarial_prompt": "probes.adversarial_prompt:AdversarialPromptProbe",
}

# What a probe may declare in `requires`; the engine checks each before any generation starts.
REQUIREMENTS = {
    "base_model": "the original, un-erased model (--base-model)",
    "reference_images": "base-model images of the concept (generated once, or a folder)",
    "latent_classifier": "a latent classifier per concept (engine train-classifier)",
    "learned_embedding": "a textual-inversion embedding per (model, concept)",
}


MAX_IMAGE_SIDE = 4096

# Why a row exists (engine.pipeline.pairing decides; the `role` column of every row).
RECOVERY, PRESERVATION, BASE, UNPAIRED = "recovery", "preservation", "base", "unpaired"
ROLES = (RECOVERY, PRESERVATION, BASE, UNPAIRED)


class ProbeParams(BaseModel):
    """Parameters every probe shares. Subclasses add their own; unknown keys are rejected, and so
    are NaN and infinities in every float field (sweep lists included)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    num_inference_steps: int = Field(50, ge=1, le=1000, description="Denoising steps (the original: 50).")
    guidance_scale: float = Field(7.5, ge=0.0, description="Classifier-free guidance scale (the original: 7.5).")
    negative_prompt: str = Field("", description="Negative prompt for classifier-free guidance.")
    # Multiples of 8, as diffusers pipelines require; the cap keeps a typo from asking for terabytes.
    height: int | None = Field(
        None, ge=8, le=MAX_IMAGE_SIDE, multiple_of=8,
        description="Image height in pixels (a multiple of 8); default: the model's native size.",
    )
    width: int | None = Field(
        None, ge=8, le=MAX_IMAGE_SIDE, multiple_of=8,
        description="Image width in pixels (a multiple of 8); default: the model's native size.",
    )

    def canonical_json(self) -> str:
        """Every field, defaults included, sorted and compact: part of each row's identity."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))


# A probe's own params class: Probe and ProbeBatch are generic over it, so a probe's hooks take its params.
ParamsT = TypeVar("ParamsT", bound=ProbeParams)


@dataclass(frozen=True)
class WorkRow:
    """The identity of one output row; `row_id` hashes the fields from `model` to `seed` (and the
    model's and base model's specs)."""

    row_id: str
    model: str
    method: str
    concept: str
    target_concept: str
    probe: str
    params: str
    prompt: str
    prompt_index: int
    seed: int
    # Not part of the identity: why the row exists (engine.pipeline.pairing) and what its model erased.
    role: str = UNPAIRED  # one of ROLES
    erased: tuple[str, ...] = ()
    # What made the row beyond its params, hashed into row_id (Probe.row_identity): a classifier's hash.
    classifier_hash: str | None = None


@dataclass
class ProbeContext:
    """What a probe may reach beyond its rows: device, the base model, concepts, a cache folder."""

    device: torch.device
    base_pipeline: Callable[[], Any]
    concept: Callable[[str], Any]
    cache_dir: Path
    options: dict[str, Any] = field(default_factory=dict)
    # selector_scores(selector_name, images, concept_name, regions) -> one score per image, higher
    # = more of the concept. Best-of-N probes pick argmax (see ProbeOutput). Provided by the
    # runner (engine.scoring.selectors.SelectorBank); names: judge, clip, latent_classifier, none.
    selector_scores: Callable[..., list[float]] | None = None
    # judge_hits(images, concept_name, regions) -> one bool per image: is the run's classifier judge's
    # top-1 class one of the concept's classes (the `judge_top1` rule, same model and classes as the
    # judge slot), each image cropped to its region; None when the run has no classifier judge or the
    # concept has no classes for it (a style). For probes that stop or count on recognition (best-of-N
    # candidate hits, attacks that stop on success). Provided by the runner (SelectorBank.judge_hits);
    # a probe that keeps an image because of the hits passes record_selection=True, so its rows'
    # `selector` column names the judge and reports mark the rate as selection-inflated.
    judge_hits: Callable[..., list[bool] | None] | None = None


@dataclass
class ProbeBatch(Generic[ParamsT]):
    rows: list[WorkRow]
    params: ParamsT
    pipeline: Any  # the model under test (a diffusers StableDiffusionPipeline)
    context: ProbeContext

    @property
    def prompts(self) -> list[str]:
        return [r.prompt for r in self.rows]

    @property
    def seeds(self) -> list[int]:
        return [r.seed for r in self.rows]


@dataclass
class ProbeOutput:
    """One image per row (uint8, HxWx3), per-row extras, and optionally the region that counts
    for scoring, as (left, top, right, bottom) pixels.

    Best-of-N probes (engine.best_of_n) also fill `candidates`:
    - `candidates[i]` is every candidate image generated for row i (uint8 HxWx3, the kept one
      included, in candidate order), or None/[] for a row without candidates. The engine judges
      each candidate with the run's judges, cropped to the row's scoring region, and stores per
      row `candidate_count`, `candidate_clip_mean`, `candidate_top1_rate`, `candidate_top5_rate`
      (the mean over all candidates that reports show next to the kept image's rate). Candidate
      images themselves are not stored.
    - Pick with `batch.context.selector_scores(params.selector, images, concept_name, regions)`,
      which returns one float per image, higher = more concept; keep the argmax. Type the params
      field as `selector: engine.scoring.selectors.SelectorName` so unknown names are rejected with
      the run config. Call it for "none" too (it returns zeros, so argmax keeps candidate 0): the
      engine records every selector called during the batch in the rows' `selector` column.
    - Put the kept candidate's index and its selector score in extras, e.g.
      `{"selected_candidate": 3, "selector_score": 0.91}`.
    """

    images: list[np.ndarray]
    extras: list[dict[str, Any]] | None = None
    scoring_regions: list[tuple[int, int, int, int] | None] | None = None
    candidates: list[list[np.ndarray] | None] | None = None

    def __post_init__(self):
        n = len(self.images)
        if self.extras is None:
            self.extras = [{} for _ in range(n)]
        if self.scoring_regions is None:
            self.scoring_regions = [None] * n
        if self.candidates is None:
            self.candidates = [None] * n
        if len(self.extras) != n or len(self.scoring_regions) != n or len(self.candidates) != n:
            raise ValueError("ProbeOutput lists must have one entry per image")


SAMPLERS = ("ddim", "pipeline")
PROBE_ROLES = (RECOVERY, PRESERVATION)
# The facts every probe class states about itself (the conformance suite checks each is declared).
# The engine reads these instead of keeping lists of probe names: pairing, the cost plan and the
# report all ask the class.
PROBE_FACTS = ("sampler", "role", "needs_base_reference", "best_of_n", "base_reference", "baseline")


class Probe(ABC, Generic[ParamsT]):
    """Base class. Subclasses set `name`, `params_class`, `requires`, the facts below, and implement `run`."""

    name: ClassVar[str]
    params_class: ClassVar[type[ProbeParams]] = ProbeParams
    requires: ClassVar[frozenset[str]] = frozenset()
    # `ddim`: the probe runs its own DDIM loop (n UNet calls for n steps); `pipeline`: it calls the
    # model's own pipeline and scheduler (PNDM for SD 1.x: n + 1 calls).
    sampler: ClassVar[str]
    # `recovery`: it asks whether an erased concept comes back; `preservation`: it draws the other
    # concepts of the set (what erasure broke). Pairing and the report both read this.
    role: ClassVar[str]
    # Whether it needs base-model images of the concept (generated once, shared by probes).
    needs_base_reference: ClassVar[bool]
    # Whether it makes several candidates per prompt and keeps one (engine.best_of_n).
    best_of_n: ClassVar[bool]
    # Whether the base model runs it by default as the reference of a paired grid (`base_probes`).
    base_reference: ClassVar[bool]
    # The plain generation every other probe is compared with: listed first in tables, and the base
    # model's image of a prompt and seed when the base model did not run the probe itself.
    baseline: ClassVar[bool]
    # The probe's own params for the cheapest run that still exercises its algorithm (a two-point
    # sweep, one hand-over step...), on top of few steps and small images: the conformance suite
    # and smoke runs use it.
    smoke_params: ClassVar[dict[str, Any]] = {}
    # Whether its images are partly the base model's work (diffusion completion hands the base
    # model's trajectory over): such a probe does not act on the erased model alone, so it is left
    # out of the report's worst case over probes (engine.report.worst_case).
    uses_base_trajectory: ClassVar[bool] = False
    # The probe whose null this probe's rows are (a control: same budget, no optimisation), or None.
    # Controls are left out of the worst case and pooled into its null line. A probe whose params
    # choose between measuring and controlling overrides `controls`.
    control_of: ClassVar[str | None] = None

    def controls(self, params: ParamsT) -> str | None:
        """The probe these params' rows are a control of, or None. Default: the class fact `control_of`."""
        return self.control_of

    def images_per_row(self, params: ParamsT) -> int:
        """Images a row generates at most (best-of-N candidates are counted apart, from `candidates()`):
        1 by default; an attack that makes an image per optimisation round says more. `engine plan`."""
        return 1

    def row_optimisation_passes(self, params: ParamsT) -> int:
        """UNet forward + backward passes a row optimises for (an adversarial prompt's steps), at most;
        0 when it optimises nothing. `engine plan` counts them."""
        return 0

    def check_request(  # an optional hook: most probes need no extra check
        self, params: ParamsT, concepts: list[str], options: dict[str, Any]
    ) -> None:
        """Extra checks in the driver, before any work (e.g. a classifier file exists). Raise UserError."""

    @abstractmethod
    def run(self, batch: ProbeBatch[ParamsT]) -> ProbeOutput:
        """Generate one image per row of `batch`."""

    # Params fields that row_identity replaces in the row's identity (a folder path by its content's hash).
    identity_excludes: ClassVar[tuple[str, ...]] = ()

    def row_identity(self, concept: ConceptSpec, params: ParamsT) -> dict[str, str]:
        """Per concept: what else makes this probe's rows beyond their params, e.g. `{"classifier_hash":
        ...}` (engine.results columns). It enters row_id, so a change regenerates the rows on resume. Default: none."""
        return {}

    def expand_params(self, params: ParamsT) -> list[ParamsT]:
        """The params of the rows this request becomes. Default: one. A best-of-N probe asked to
        keep every candidate returns one single-candidate params per candidate, so each candidate
        is its own row (and reproducible alone)."""
        return [params]

    def work_prompts(self, concept, concepts: dict[str, Any], num_images: int, params: ParamsT):
        """(target_concept, prompt_index, prompt, seed) for each row this probe makes for `concept`.
        Default: the concept's own prompts, sampled as the original does."""
        return [(concept.name, i, prompt, seed) for i, prompt, seed in concept.sample_prompts(num_images)]

    def base_reference_requests(self, row: WorkRow, concept, params: ParamsT) -> list[tuple[str, int]]:
        """The (prompt, seed) base-model images a row needs (probes with `needs_base_reference`);
        equal requests are generated once. `engine plan` counts them."""
        return []

    def training_passes(self, params: ParamsT) -> int:
        """UNet forward + backward passes the probe trains for once per (model, concept) before
        generating (textual inversion's embedding); 0 when it trains nothing. `engine plan` counts them."""
        return 0

    def reference_prompts(self, concept, num_images: int, params: ParamsT):
        """The rows on which the base model gives this probe's reference number for `concept` (the
        same prompts and seeds the erased models' rows use). Default: the probe's own rows."""
        return self.work_prompts(concept, {concept.name: concept}, num_images, params)


# --------------------------------------------------------------------------- registry


def probe_names() -> list[str]:
    return sorted(PROBE_REGISTRY)


def probes_where(**facts: Any) -> list[str]:
    """Registered probes whose class facts equal `facts` (e.g. `role="preservation"`), in registry order."""
    return [name for name in PROBE_REGISTRY
            if all(getattr(get_probe_class(name), fact) == value for fact, value in facts.items())]


def probe_fact(name: str, fact: str, default: Any) -> Any:
    """One fact of a probe by name; `default` for a name no longer registered (an older run's rows)."""
    if name not in PROBE_REGISTRY:
        return default
    return getattr(get_probe_class(name), fact)


def preservation_probes(names) -> set[str]:
    """Those of `names` whose class's role is preservation: the one rule, for the grid and the report."""
    return {name for name in set(names) if probe_fact(name, "role", RECOVERY) == PRESERVATION}


def row_control_of(name: str, params_json: str) -> str | None:
    """The probe a row of `name` with these params is a control of (its class's `controls`), or None;
    None for a probe no longer registered, and the class fact for params this version cannot read."""
    if name not in PROBE_REGISTRY:
        return None
    probe_class = get_probe_class(name)
    try:
        params = probe_class.params_class.model_validate_json(params_json)
    except ValidationError:
        return probe_class.control_of
    return probe_class().controls(params)


def worst_case_probe_names(names) -> set[str]:
    """Those of `names` that act on the erased model alone: recovery probes that use no base-model
    trajectory and are no control class. The default probe set of the report's worst case."""
    return {name for name in set(names) if name in PROBE_REGISTRY
            and probe_fact(name, "role", RECOVERY) == RECOVERY
            and not probe_fact(name, "uses_base_trajectory", False)
            and probe_fact(name, "control_of", None) is None}


def baseline_probes(names) -> set[str]:
    return {name for name in set(names) if probe_fact(name, "baseline", False)}


def get_probe_class(name: str) -> type[Probe]:
    return load_probe_class(probe_entry(name))


def probe_entry(name: str) -> str:
    """The registry's "module:Class" of a probe. The driver hands these to the actors, so an actor
    runs exactly the class the driver validated (also one a test registered)."""
    if name not in PROBE_REGISTRY:
        raise unknown_choice("probe", name, PROBE_REGISTRY)
    return PROBE_REGISTRY[name]


def load_probe_class(entry: str) -> type[Probe]:
    module_name, class_name = entry.split(":")
    return getattr(importlib.import_module(module_name), class_name)


def parse_params(probe_name: str, raw: dict[str, Any], source: Callable[[tuple], str] | None = None) -> ProbeParams:
    """Validated params of a probe. `source(loc)`, when given, names where the value at `loc` was
    written (a run file line, --probe-param, --set) and leads the error message."""
    params_class = get_probe_class(probe_name).params_class
    try:
        return params_class.model_validate(raw)
    except ValidationError as exc:
        where = f"probe {probe_name} params"
        label = where if source is None else (lambda loc: f"{source(loc)}: {where}")
        raise format_validation_error(exc, label, params_class) from None


def describe_params(params_class: type[ProbeParams]) -> list[tuple[str, str, str, str]]:
    """(name, type, default, description) for each field, for `engine probes describe`."""
    rows = []
    for name, info in params_class.model_fields.items():
        annotation = getattr(info.annotation, "__name__", None) or str(info.annotation)
        default = "required" if info.is_required() else json.dumps(info.get_default(call_default_factory=True))
        rows.append((name, annotation.replace("typing.", ""), default, info.description or ""))
    return rows


# --------------------------------------------------------------------------- shared helpers


def derived_seed(seed: int, *variant: Any) -> int:
    """The seed of one candidate: `seed` itself for the plain row, else a hash of (seed, variant),
    so any candidate of a sweep can be reproduced alone."""
    if not variant:
        return int(seed)
    text = json.dumps([int(seed), *variant], separators=(",", ":"))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") & ((1 << 63) - 1)


def row_generator(seed: int, *variant: Any) -> torch.Generator:
    """A CPU generator per row and candidate. Noise is drawn on the CPU (as the original's plain
    probe did with torch.manual_seed), so a seed gives the same start on every device."""
    import torch

    return torch.Generator("cpu").manual_seed(derived_seed(seed, *variant))


def to_uint8(images: np.ndarray) -> list[np.ndarray]:
    """Float images in [0, 1] (NHWC) -> uint8 arrays, rounded as diffusers' numpy_to_pil does."""
    # NaN (diverged latents) becomes black, never an arbitrary cast: the engine records an all-black
    # image as a failed row instead of keeping it.
    array = np.clip(np.nan_to_num(np.asarray(images, dtype=np.float32), nan=0.0), 0.0, 1.0)
    return [np.ascontiguousarray((image * 255).round().astype(np.uint8)) for image in array]


def require(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)
