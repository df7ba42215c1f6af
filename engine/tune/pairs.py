"""Driver side of `engine tune`: validate a tune spec and fix the (model, concept) pairs and their rows.

Nothing is loaded here; every name is checked before any trial starts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from engine.errors import UserError
from engine.models.resolve import expand_model_refs, resolve_model
from engine.pipeline.grid import expand_run
from engine.scoring.preflight import check_run_scoring
from engine.scoring.registry import get_judge_class, judge_requests
from engine.specs.concepts import ConceptSpec
from engine.specs.runs import ModelSpec, run_spec_from_dict
from engine.specs.sources import Sources
from engine.storage import OutputLocation, output_location
from engine.tune.space import OBJECTIVES, SearchSpace, TuneSpec, parse_space

TRIALS_FILE = "trials.parquet"
METRIC = "objective"  # the key every trial reports its objective under (TuneConfig metric)
TPE_MAX_CONCURRENT = 4  # TPE learns from finished trials; many pending ones make it a random search


@dataclass
class PairJob:
    """One (model, concept) search, validated against the run config `engine run` would read."""

    model_ref: str | dict[str, Any]
    model: ModelSpec
    concept: ConceptSpec
    grid: Any  # engine.pipeline.grid.RunGrid of the run config with the space's first corner
    rows_per_trial: int


@dataclass
class TuneRun:
    spec: TuneSpec
    space: SearchSpace
    jobs: list[PairJob]
    output: OutputLocation


def prepare_tune(spec: TuneSpec, where: str | Sources = "tune config") -> TuneRun:
    """Check everything a search needs before Ray or any model starts. Raises UserError.

    A model that declares erased concepts is searched on those (recovery is the objective): on
    all of them when the config lists no concept, else on the listed ones it erased."""
    if not spec.models:
        raise UserError(f"{where}: no model to tune: give --model or `models:`")
    space = parse_space(spec, where)
    output = output_location(spec.output)
    if output.exists(TRIALS_FILE):
        raise UserError(
            f"{output.display(TRIALS_FILE)} exists from an earlier search; choose another --output or delete it"
        )
    corner = {dim.key: dim.bounds()[0] for dim in space.dimensions}
    jobs = []
    for model_ref in expand_model_refs(list(spec.models)):
        model = resolve_model(model_ref, check_source=False)
        ref = model_ref if isinstance(model_ref, str) else model_ref.model_dump(mode="json")
        for concept in tuned_concepts(spec, model, where):
            data = run_data(spec, ref, concept, space.raw_params(corner), output)
            grid = expand_run(run_spec_from_dict(data, str(where)))  # its keys are the run's, not the tune file's
            check_run_scoring(grid.spec, grid.concepts, [p.params for p in grid.probes])
            _check_objective(spec, grid, where)
            if spec.held_out:
                held_out_prompts(grid.concepts[concept], spec.num_images)  # enough fresh prompts?
            jobs.append(PairJob(ref, grid.models[0], grid.concepts[concept], grid, len(grid.rows)))
    if spec.scheduler is not None and spec.scheduler.grace_period >= min(j.rows_per_trial for j in jobs):
        raise UserError(
            f"{where}: scheduler.grace_period {spec.scheduler.grace_period} must be below the images per trial "
            f"({min(j.rows_per_trial for j in jobs)}), or no trial can be stopped early"
        )
    return TuneRun(spec, space, jobs, output)


def tuned_concepts(spec: TuneSpec, model: ModelSpec, where: str | Sources) -> list[str]:
    """The concepts `model` is searched on: its erased ones (filtered by the listed), else the listed."""
    if not model.erased:
        if not spec.concepts:
            raise UserError(f"{where}: no concept to tune for {model.name!r}, which declares no erased concept: "
                            "give --concept or `concepts:`")
        return list(spec.concepts)
    concepts = [c for c in spec.concepts if c in model.erased] if spec.concepts else list(model.erased)
    if not concepts:
        raise UserError(f"{where}: {model.name!r} erased {', '.join(model.erased)}, none of the concepts to tune "
                        f"({', '.join(spec.concepts)}); its objective is recovery of what it erased")
    return concepts


def held_out_prompts(concept: ConceptSpec, num_images: int) -> list[tuple[int, str, int]]:
    """The held-out set of a search on `concept`: the next `num_images` prompts in the concept's
    sampling order whose seeds the search's `num_images` prompts do not use (same size, disjoint)."""
    order = concept.sample_prompts(len(concept.seed_list()))
    searched = {seed for _, _, seed in order[:num_images]}
    fresh = [(i, prompt, seed) for i, prompt, seed in order[num_images:] if seed not in searched][:num_images]
    if len(fresh) < num_images:
        raise UserError(
            f"concept {concept.name!r} has {len(fresh)} prompts beyond the search's {num_images} (with unused seeds); "
            f"a held-out re-run needs {num_images}: lower num_images or set held_out: false"
        )
    return fresh


def held_out_indices(concept: ConceptSpec, num_images: int) -> list[int]:
    """The prompt indices of the held-out set (RunSpec.prompt_indices), in sampling order."""
    return [index for index, _, _ in held_out_prompts(concept, num_images)]


def run_data(spec: TuneSpec, model_ref, concept: str, params: dict[str, Any], output: OutputLocation,
             prompt_indices: list[int] | None = None) -> dict[str, Any]:
    """The run config of one (model, concept) pair with `params`: what `engine run` reads.
    `prompt_indices`: the prompts it evaluates (the held-out ones, for the best config)."""
    model_name = model_ref if isinstance(model_ref, str) else model_ref["name"]
    data: dict[str, Any] = {
        "output": output.child(f"best_{slug(model_name)}_{slug(concept)}").uri,
        "models": [model_ref],
        "base_model": spec.base_model,
        "concepts": [concept],
        "probes": [{"name": spec.probe, "params": params}],
        "num_images": spec.num_images,
        **({"prompt_indices": list(prompt_indices)} if prompt_indices is not None else {}),
        "batch_size": spec.batch_size,
        "device": spec.device,
        "attention": spec.attention,
        "score_batch_size": spec.score_batch_size,
    }
    if spec.torch_threads is not None:
        data["torch_threads"] = spec.torch_threads
    if spec.judges is not None:
        data["judges"] = list(spec.judges)
    return data


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"


def _check_objective(spec: TuneSpec, grid, where: str | Sources) -> None:
    slot = OBJECTIVES[spec.objective][1]
    requests = [r for r in judge_requests(grid.spec.judges) if get_judge_class(r.name).slot == slot]
    if not requests:
        raise UserError(f"{where}: objective {spec.objective} needs a {slot} judge in `judges:`; the run has none")
    classes_key = getattr(get_judge_class(requests[0].name), "classes_key", None)
    for concept in grid.concepts.values():
        if classes_key is not None and classes_key not in concept.judge_classes:
            raise UserError(
                f"concept {concept.name!r} has no judge_classes.{classes_key}, so {spec.objective} is never "
                "measured for it (a style?); tune it with --objective clip_score"
            )
