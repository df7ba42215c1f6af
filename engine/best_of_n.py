"""The best-of-N base: probes that make several candidate trajectories per prompt and keep one.

A best-of-N probe (noise sweep, classifier-guidance sweeps) declares only its candidate list (its
params' `candidates()`, one dict per candidate, and `sweep_fields`, the list field each candidate
key comes from) and, if it needs them, its step-noise settings and its guidance hook. This base
holds the rest, once:

- expansion: with `keep_all_candidates` every candidate becomes its own row, whose params hold a
  one-candidate sweep (so each candidate is reproducible alone and has its own row_id);
- the candidate check (one candidate per keep-all row; a selector needs the scoring context);
- chunked candidate denoising: every (row, candidate) pair of the batch runs through
  engine.sampling's DDIM loop, `candidate_batch_size` at a time;
- the starting noise (`initial_noise`): `per_candidate` (default) seeds one generator per candidate
  from (row seed, candidate) that draws the candidate's x_T and then its step noise, so candidates of
  one prompt start from different noise, as in the original, where every variant continued one
  random stream; `shared` draws every candidate's x_T from the row's seed, exactly as the
  standard_prompt probe draws it, and the step noise from the candidate's own generator (a
  controlled comparison: candidates then differ only by their trajectory);
- selection: a selector (never the judge by default: selecting with the model that also judges
  inflates the judged rate) picks one candidate per row, and the row's extras keep every
  candidate's score; every candidate image goes to the scoring stage, which records the mean over
  all candidates beside the kept one's score;
- `stop: on_hit` (engine.best_of_n_stop): candidates in a coverage-first order, in rounds, and a
  prompt stops at its first candidate the judge recognises, which it keeps.
"""

from __future__ import annotations

import json
from abc import abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, TypeVar, cast

import numpy as np
import torch
from pydantic import Field, model_validator

from engine import sampling
from engine.best_of_n_stop import run_until_hit
from engine.errors import UserError
from engine.probe import Probe, ProbeBatch, ProbeOutput, ProbeParams, row_generator

if TYPE_CHECKING:
    from engine.specs.concepts import ConceptSpec


def unique_values(values: list[float], minimum: float | None = None, strict: bool = False) -> list[float]:
    """A sweep list's check: non-empty, no repeats, every value >= minimum (> minimum if strict)."""
    if not values:
        raise ValueError("give at least one value")
    if len(set(values)) != len(values):
        raise ValueError(f"values listed more than once: {values}")
    if minimum is not None and any(v < minimum or (strict and v == minimum) for v in values):
        raise ValueError(f"values must be {'>' if strict else '>='} {minimum}")
    return values


class BestOfNParams(ProbeParams):
    """How candidates start, and how one per prompt is chosen, or all kept."""

    # Candidate key -> the params list field it is swept over (set by each probe's params).
    sweep_fields: ClassVar[dict[str, str]] = {}

    # The names of engine.scoring.selectors.SelectorName, spelled out so probes import no scoring code.
    selector: Literal["clip", "judge", "latent_classifier", "none"] = Field(
        "clip",
        description="Picks one candidate per prompt: clip, judge (inflates recovery when it also judges), "
        "latent_classifier, or none (only with keep_all_candidates).",
    )
    keep_all_candidates: bool = Field(
        False, description="Write every candidate of the sweep as its own row instead of the selected one."
    )
    candidate_batch_size: int = Field(
        16, ge=1, description="Candidates denoised together in one UNet batch (memory vs speed)."
    )
    initial_noise: Literal["per_candidate", "shared"] = Field(
        "per_candidate",
        description="per_candidate: each candidate draws its own x_T from (seed, candidate), as the original's "
        "candidates each started from new noise; shared: every candidate starts from the row seed's x_T "
        "(the standard probe's), for controlled comparisons.",
    )

    stop: Literal["none", "on_hit"] = Field(
        "none",
        description="none: every candidate of the sweep is made; on_hit: candidates are made in a coverage-first "
        "order, candidate_batch_size per round, and a prompt stops at its first candidate the run's classifier "
        "judge recognises (top-1), which it keeps; prompts without a hit run the full sweep and the selector picks. "
        "The any-candidate hit is the exhaustive sweep's. Not with keep_all_candidates.",
    )

    control: Literal["off", "also", "only"] = Field(
        "off",
        description="Best-of-N control: the same number of candidates, starting noise, sampler and selection, "
        "with the probe's intervention set to zero (noise_based: eta 1 and v 1; noise_classifier_guidance: "
        "guidance scale 0). also: the probe's rows and the control's; only: the control's. Control rows are "
        "separate rows, and the report shows them beside the probe's.",
    )

    @property
    def is_control(self) -> bool:
        """Whether these params make control rows (the intervention set to zero)."""
        return self.control == "only"

    @model_validator(mode="after")
    def _selector_or_keep_all(self):
        if self.selector == "none" and not self.keep_all_candidates:
            raise ValueError(
                "selector 'none' picks no candidate: set keep_all_candidates: true (one row per candidate) "
                "or a selector (clip, judge, latent_classifier)"
            )
        if self.stop == "on_hit" and self.keep_all_candidates:
            raise ValueError(
                "stop: on_hit keeps one candidate per prompt (its first hit); keep_all_candidates writes every "
                "candidate as a row: choose one"
            )
        return self

    def canonical_json(self) -> str:
        """As every probe's, but `stop` only when it is not `none`: rows written before the field
        existed keep their params text and row_id, and a default run resumes onto them."""
        data = self.model_dump(mode="json")
        if data.get("stop") == "none":
            del data["stop"]
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    @abstractmethod  # pydantic's model metaclass is an ABCMeta: every best-of-N probe's params must say it
    def candidates(self) -> list[dict[str, float]]:
        """One dict per candidate, in sweep order; its keys are those of `sweep_fields`."""


# The params class of one best-of-N probe.
BestOfNParamsT = TypeVar("BestOfNParamsT", bound=BestOfNParams)


class BestOfNProbe(Probe[BestOfNParamsT], Generic[BestOfNParamsT]):
    """Base of the best-of-N probes. Subclasses set `name` and `params_class` and may override the
    hooks `prepare_params`, `step_noise`, `noise_key`, `guidance` and `candidate_extras`."""

    sampler = "ddim"
    role = "recovery"
    needs_base_reference = False
    best_of_n = True
    base_reference = False
    baseline = False
    # Set by a probe that has no `control: true` of its own: what its control is (reports print it).
    control_note: ClassVar[str | None] = None

    params_class = BestOfNParams

    # --------------------------------------------------------------- hooks

    def prepare_params(self, params: BestOfNParamsT) -> BestOfNParamsT:
        """Params as they enter the row identity (e.g. a folder made absolute). Default: unchanged."""
        return params

    def step_noise(self, params: BestOfNParamsT, candidate: dict[str, float]) -> tuple[float, float]:
        """(eta, noise multiplier v) of a candidate's DDIM steps. Default: deterministic DDIM."""
        return 0.0, 1.0

    def noise_key(self, candidate: dict[str, float]) -> tuple:
        """What a candidate's own generator is derived from, with the row's seed."""
        return tuple(candidate.values())

    def guidance(self, batch: ProbeBatch[BestOfNParamsT], rows: list, candidates: list[dict[str, float]], latents,
                 schedule):
        """A hook (x_t, t, eps) -> eps for one chunk of candidates, or None (no guidance)."""
        return None

    def candidate_extras(self, guidance, latents: torch.Tensor) -> list[dict[str, Any]]:
        """Per-candidate values to keep in the extras (e.g. a classifier's logit of the result)."""
        return [{} for _ in range(latents.shape[0])]

    def uses_classifier(self, params: BestOfNParams) -> bool:
        """Whether the concept's latent classifier makes these rows (here: it selects them)."""
        return params.selector == "latent_classifier" and not params.keep_all_candidates

    # --------------------------------------------------------------- shared machinery

    identity_excludes = ("classifier_dir",)

    def row_identity(self, concept: ConceptSpec, params: BestOfNParamsT) -> dict[str, str]:
        """The concept's classifier content hash, for rows a latent classifier guides or selects: the
        identity names the classifier itself, not the folder it was read from."""
        if not self.uses_classifier(params):
            return {}
        from engine.guidance.latent_classifier_io import DEFAULT_CLASSIFIER_DIR, classifier_hash

        folder = getattr(params, "classifier_dir", None) or DEFAULT_CLASSIFIER_DIR
        return {"classifier_hash": classifier_hash(folder, concept.name)}

    def expand_params(self, params: BestOfNParamsT) -> list[BestOfNParamsT]:
        params = self.prepare_params(params)
        if params.control == "also":  # the probe's own rows (as without a control), then the control's
            arms = [params.model_copy(update={"control": c}) for c in ("off", "only")]
            return [expanded for arm in arms for expanded in self.expand_params(arm)]
        if not params.keep_all_candidates:
            return [params]
        # One row per candidate. Nothing is selected among one candidate, so the selector is 'none'
        # and does not enter the row's identity; expanding twice changes nothing.
        base = params.model_dump()
        return [
            # params_class is this probe's BestOfNParamsT (a ClassVar cannot name a type variable).
            cast(BestOfNParamsT, self.params_class.model_validate(
                {**base, **{field: [candidate[key]] for key, field in params.sweep_fields.items()}, "selector": "none"}
            ))
            for candidate in params.candidates()
        ]

    def check_candidates(self, batch: ProbeBatch[BestOfNParamsT], candidates: list[dict[str, float]]) -> None:
        params = batch.params
        if params.keep_all_candidates and len(candidates) != 1:
            raise ValueError("keep_all_candidates rows hold one candidate each; expand the params first")
        if not params.keep_all_candidates and batch.context.selector_scores is None:
            raise UserError(f"selector {params.selector!r} is not available in this run (no scoring context)")

    def generators(self, params: BestOfNParamsT, rows: list, candidates: list[dict[str, float]]):
        """(x_T generators, step-noise generators), one of each per candidate of the chunk."""
        own = [row_generator(row.seed, *self.noise_key(c)) for row, c in zip(rows, candidates, strict=False)]
        if params.initial_noise == "per_candidate":
            return own, own  # one stream per candidate: x_T first, then the step noise
        return [row_generator(row.seed) for row in rows], own

    def denoise_candidates(self, batch: ProbeBatch[BestOfNParamsT], rows: list, candidates: list[dict[str, float]],
                           schedule):
        """Images and per-candidate extras of one chunk of (row, candidate) pairs."""
        params = batch.params
        pipe = batch.pipeline
        embeddings = sampling.encode_prompts(pipe, [row.prompt for row in rows], params.negative_prompt,
                                             params.guidance_scale)
        starts, steps = self.generators(params, rows, candidates)
        latents = sampling.initial_latents(pipe, starts, params.height, params.width)
        noise = [self.step_noise(params, c) for c in candidates]
        guidance = self.guidance(batch, rows, candidates, latents, schedule)
        latents = sampling.denoise(
            pipe,
            latents,
            embeddings,
            schedule,
            params.guidance_scale,
            eta=torch.tensor([eta for eta, _ in noise]),
            variance_scale=torch.tensor([v for _, v in noise]),
            generators=steps,
            guidance=guidance,
        )
        return sampling.decode(pipe, latents), self.candidate_extras(guidance, latents)

    @torch.no_grad()
    def run(self, batch: ProbeBatch[BestOfNParamsT]) -> ProbeOutput:
        params = batch.params
        candidates = params.candidates()
        self.check_candidates(batch, candidates)
        schedule = sampling.DDIMSchedule.from_pipeline(batch.pipeline, params.num_inference_steps)
        if params.stop == "on_hit":  # rounds in coverage order, each prompt stopped at its first hit
            return run_until_hit(batch, candidates,
                                 lambda rows, chunk: self.denoise_candidates(batch, rows, chunk, schedule))
        # 1. Every (row, candidate) pair in sweep order, rows one after another, denoised in chunks;
        #    only uint8 images stay in memory.
        work = [(row, candidate) for row in batch.rows for candidate in candidates]
        images: list[np.ndarray] = []
        extras: list[dict[str, Any]] = []
        for start in range(0, len(work), params.candidate_batch_size):
            chunk = work[start : start + params.candidate_batch_size]
            chunk_images, chunk_extras = self.denoise_candidates(
                batch, [row for row, _ in chunk], [c for _, c in chunk], schedule
            )
            images.extend(chunk_images)
            extras.extend(chunk_extras)
        # 2. A keep-all row is its single candidate; otherwise the selector's pick per row.
        if params.keep_all_candidates:
            return ProbeOutput(images=images, extras=[{**candidates[0], **e} for e in extras])
        return select(batch, candidates, images, extras)


def select(batch: ProbeBatch[Any], candidates: list[dict[str, float]], images: list[np.ndarray],
           extras: list[dict[str, Any]]) -> ProbeOutput:
    """The selector's argmax among each row's candidates; every candidate goes along for the
    all-candidates mean. Extras: the kept candidate's settings and values, every candidate's score,
    and every candidate's value of each per-candidate extra (`candidate_<key>s`)."""
    selector = batch.params.selector
    per_row = len(candidates)
    selector_scores = batch.context.selector_scores
    assert selector_scores is not None  # check_candidates refused a selecting batch without a scoring context
    out_images: list[np.ndarray] = []
    out_extras: list[dict[str, Any]] = []
    row_candidates: list[list[np.ndarray] | None] = []
    for index, row in enumerate(batch.rows):
        row_images = images[index * per_row : (index + 1) * per_row]
        row_extras = extras[index * per_row : (index + 1) * per_row]
        scores = [float(s) for s in selector_scores(selector, row_images, row.target_concept, [None] * per_row)]
        if len(scores) != per_row:
            raise RuntimeError(f"selector {selector!r} returned {len(scores)} scores for {per_row} images")
        chosen = int(np.argmax(scores))
        out_images.append(row_images[chosen])
        row_candidates.append(row_images)
        out_extras.append({
            "selected_candidate": chosen,
            **candidates[chosen],
            "selector": selector,
            "selector_score": scores[chosen],
            "candidate_scores": scores,
            **row_extras[chosen],
            **{f"candidate_{key}s": [e[key] for e in row_extras] for key in row_extras[chosen]},
        })
    return ProbeOutput(images=out_images, extras=out_extras, candidates=row_candidates)
