"""Which concepts each model runs each probe on, and the role of those rows.

A model that declares erased concepts is paired with them:
- every recovery probe (all but interference) runs on its erased concepts that the run lists
  (`recovery` rows: does the concept come back?);
- interference runs on the other concepts of each concept set it erased from, listed or not
  (`preservation` rows: what did erasure break?), once per set however many of the set's concepts
  the model erased (the rows carry the first of them, in the run's order, as `concept`); its
  erased concepts are left out.
In a run with such models, the base model (method `none`: the run's `base_model`, or a model
labelled none) runs each listed concept as the reference (`base` rows), for the probes where a
base number means something (the run's `base_probes`); its interference reference covers every
concept an erased model's interference draws, on the same prompts and seeds.
A model that declares nothing keeps the full product of the run's concepts (`unpaired` rows, or
`base` for the base model), exactly the rows it always got; so does the base model in a run
without erased models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.probe import BASE, PRESERVATION, RECOVERY, ROLES, UNPAIRED, preservation_probes, probes_where
from engine.specs.concepts import ConceptSpec, concept_set_members
from engine.specs.runs import BASE_METHOD, ModelSpec


def is_preservation_probe(probe: str) -> bool:
    """Whether the probe draws the other concepts of the set rather than the erased one (its class's `role`)."""
    return bool(preservation_probes([probe]))


def default_base_probes() -> frozenset[str]:
    """The base model's reference probes by default (each class's `base_reference`): the original's
    table has a base number for the standard prompt and the noise sweep; inpainting's base number is
    the probe's ceiling (the context alone); interference's is the denominator of every preservation ratio."""
    return frozenset(probes_where(base_reference=True))


@dataclass(frozen=True)
class Cell:
    """One (model, probe, concept) of the grid: the probe's rows come from
    `work_prompts(concept, universe, ...)`, or its `reference_prompts` for a base reference."""

    concept: ConceptSpec
    universe: dict[str, ConceptSpec]
    role: str
    reference: bool = False


def is_base(model: ModelSpec) -> bool:
    return model.method == BASE_METHOD


def paired_run(models: list[ModelSpec]) -> bool:
    return any(m.erased for m in models)


def model_cells(
    model: ModelSpec,
    probe: str,
    listed: dict[str, ConceptSpec],
    models: list[ModelSpec],
    base_probes: frozenset[str] | None = None,
) -> list[Cell]:
    """The cells of `model` x `probe` in a run listing `listed` with all of `models`."""
    if model.erased:
        erased = [listed[name] for name in listed if name in model.erased]
        if is_preservation_probe(probe):
            # One cell per concept set: a request (target, prompt, seed) is one row, not one per erased concept.
            first_of_set = {c.concept_set: c for c in reversed(erased)}
            return [Cell(c, preservation_universe(model, c), PRESERVATION) for c in erased
                    if first_of_set[c.concept_set] is c]
        return [Cell(c, listed, RECOVERY) for c in erased]
    role = BASE if is_base(model) else UNPAIRED
    if role == BASE and paired_run(models):
        if probe not in (default_base_probes() if base_probes is None else base_probes):
            return []
        if is_preservation_probe(probe):
            targets = {**listed, **interference_targets(models, listed)}
            return [Cell(c, {c.name: c}, BASE, reference=True) for c in targets.values()]
        return [Cell(c, listed, BASE) for c in listed.values()]
    # Today's full product. When the run lists no other concept of a concept's set, interference
    # draws the whole set, as the original drew every other concept of its data folder.
    return [Cell(c, listed if _lists_another_of_its_set(c, listed) else concept_set_members(c), role)
            for c in listed.values()]


def _lists_another_of_its_set(concept: ConceptSpec, listed: dict[str, ConceptSpec]) -> bool:
    return any(c.concept_set == concept.concept_set for name, c in listed.items() if name != concept.name)


def preservation_universe(model: ModelSpec, concept: ConceptSpec) -> dict[str, ConceptSpec]:
    """The concept's set without the model's other erased concepts (drawing them is not preservation)."""
    return {name: c for name, c in concept_set_members(concept).items()
            if name == concept.name or name not in model.erased}


def interference_targets(models: list[ModelSpec], listed: dict[str, ConceptSpec]) -> dict[str, ConceptSpec]:
    """Every concept some erased model's interference rows draw, sorted by name."""
    targets: dict[str, ConceptSpec] = {}
    for model in models:
        for name in model.erased:
            if name in listed:
                universe = preservation_universe(model, listed[name])
                targets.update({n: c for n, c in universe.items() if n != name})
    return dict(sorted(targets.items()))


def label_base(model: ModelSpec, base: ModelSpec | None) -> ModelSpec:
    """A model with the base model's weights and no label of its own is the base model (`none`)."""
    if base is None or model.method is not None or model.erased:
        return model
    same = (model.pretrained, model.unet, model.revision) == (base.pretrained, base.unet, base.revision)
    return model.model_copy(update={"method": BASE_METHOD}) if same else model


def role_counts(rows: list[Any]) -> dict[str, int]:
    counts = {role: 0 for role in ROLES}
    for row in rows:
        counts[row.role] += 1
    return counts
