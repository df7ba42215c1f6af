"""Expand a run spec into work rows, hash their identity, drop finished rows, cut work units.

One row = (model, concept, target_concept, probe, params, prompt, seed) plus a content-hash
`row_id`, so a rerun skips finished rows and nothing is written twice. Which concepts a model
runs each probe on (and the rows' `role`) is engine.pipeline.pairing's rule.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import groupby, product
from typing import Any

from engine.errors import UserError
from engine.models.resolve import check_model_source, expand_model_refs, resolve_model
from engine.pipeline.pairing import default_base_probes, label_base, model_cells
from engine.probe import ProbeParams, WorkRow, get_probe_class, parse_params
from engine.specs.concepts import ConceptSpec, available_concepts, load_concept
from engine.specs.runs import ModelSpec, RunSpec, no_duplicate_names, probe_requests


@dataclass
class ProbeChoice:
    name: str
    params: ProbeParams


@dataclass
class RunGrid:
    """A validated run: everything resolved, nothing loaded."""

    spec: RunSpec
    models: list[ModelSpec]  # the models with rows (a model whose erased concepts are all unlisted has none)
    base: ModelSpec | None  # the base model, when a probe needs it
    concepts: dict[str, ConceptSpec]  # every concept a row names: the listed ones, then interference targets
    probes: list[ProbeChoice]
    rows: list[WorkRow]
    skipped_models: list[str] = field(default_factory=list)  # erased nothing the run lists: no rows
    warnings: list[str] = field(default_factory=list)  # failed prerequisite checks (non-strict plans only)

    def resolved_config(self) -> dict[str, Any]:
        return {
            "run": self.spec.model_dump(mode="json"),
            "models": [m.model_dump(mode="json") for m in self.models],
            "base_model": self.base.model_dump(mode="json") if self.base else None,
            "concepts": {k: v.model_dump(mode="json") for k, v in self.concepts.items()},
            "probes": [{"name": p.name, "params": json.loads(p.params.canonical_json())} for p in self.probes],
            # The classifiers that made rows, by content (row identities name these, not folders).
            "classifier_hashes": {f"{r.probe}/{r.concept}": r.classifier_hash for r in self.rows if r.classifier_hash},
        }


def expand_run(spec: RunSpec, extra_models: Sequence[ModelSpec] = (), strict: bool = True) -> RunGrid:
    """Validate every name in the spec and expand the grid. Raises UserError on bad input.

    `strict=False` (engine plan) never looks for weights and records failed prerequisite checks
    (a missing classifier folder...) in `warnings` instead of raising."""
    listed = {name: load_concept(name) for name in spec.concepts}
    probes = [ProbeChoice(r.name, parse_params(r.name, r.params)) for r in probe_requests(spec)]
    base_probes = _base_probes(spec, probes)
    base_ref = resolve_model(spec.base_model, check_source=False)
    models = [label_base(resolve_model(ref, check_source=False), base_ref) for ref in expand_model_refs(spec.models)]
    models += list(extra_models)
    if not models:
        raise UserError("no model to probe: give --model, --unet or `models:` in the run file")
    try:
        no_duplicate_names(models)
    except ValueError as error:
        raise UserError(f"models: {error} (a family lists its members already)") from None
    known = available_concepts()
    for model in models:
        for name in model.erased:
            if name not in known:
                raise UserError(f"model {model.name!r} erased {name!r}, which is not a configured concept "
                                f"(valid: {', '.join(sorted(known))})")
    with_rows = [m for m in models if not m.erased or set(m.erased) & set(listed)]
    if not with_rows:
        raise UserError(f"no listed concept ({', '.join(listed)}) is one the models erased; add one of "
                        f"{', '.join(sorted({c for m in models for c in m.erased}))} to `concepts:`")
    needs_base = any("base_model" in get_probe_class(p.name).requires for p in probes)
    base = base_ref if needs_base else None
    if strict:
        for model in with_rows + ([base] if base else []):
            check_model_source(model)
    rows = expand_rows(with_rows, base, listed, probes, spec.num_images, base_probes, all_models=models,
                       prompt_indices=spec.prompt_indices)
    warnings = _check_requests(probes, rows, listed, base, strict)
    concepts = {**listed}
    for name in sorted({n for r in rows for n in (r.concept, r.target_concept)} - set(listed)):
        concepts[name] = load_concept(name)
    skipped = [m.name for m in models if m not in with_rows]
    return RunGrid(spec, with_rows, base, concepts, probes, rows, skipped, warnings)


def _base_probes(spec: RunSpec, probes: list[ProbeChoice]) -> frozenset[str]:
    names = [p.name for p in probes]
    if spec.base_probes is None:
        return frozenset(n for n in names if n in default_base_probes())
    unknown = [n for n in spec.base_probes if n not in names]
    if unknown:
        raise UserError(f"base_probes names {', '.join(unknown)}, not among the run's probes ({', '.join(names)})")
    return frozenset(spec.base_probes)


def _check_requests(probes, rows, listed, base, strict: bool) -> list[str]:
    """Each probe's own prerequisite checks, on the concepts its rows use."""
    warnings = []
    for choice in probes:
        used = {r.concept for r in rows if r.probe == choice.name}
        if not used:
            continue
        names = [n for n in listed if n in used] + sorted(used - set(listed))
        try:
            get_probe_class(choice.name)().check_request(choice.params, names, {"base": base})
        except UserError as error:
            if strict:
                raise
            warnings.append(f"{choice.name}: {error}")
    return warnings


def prompt_depth(concept, prompt_indices) -> int:
    """How many prompts to take from `concept`'s sampling order (and its file order) so that every
    one of `prompt_indices` is among them. UserError for an index the concept's list does not have."""
    total = len(concept.seed_list())
    beyond = sorted(i for i in prompt_indices if i >= total)
    if beyond:
        raise UserError(f"prompt_indices {beyond} are beyond concept {concept.name!r}'s {total} prompt/seed rows")
    order = [index for index, _, _ in concept.sample_prompts(total)]
    return max(max(order.index(i) for i in prompt_indices) + 1, max(prompt_indices) + 1)


def expand_rows(models, base, concepts, probes, num_images, base_probes=None, all_models=None,
                prompt_indices=None) -> list[WorkRow]:
    """The rows of `models` x `probes` over the listed `concepts`, each model paired with what it
    erased (engine.pipeline.pairing). `all_models`: every model of the run, when some of them
    have no rows (they still decide whether the run is paired). `prompt_indices`: only the rows
    with these prompt indices (RunSpec.prompt_indices), the same rows a deeper run would make."""
    if prompt_indices is not None:  # as deep as every concept's chosen prompts need, then only those
        depth = max(prompt_depth(concept, prompt_indices) for concept in concepts.values())
        rows = expand_rows(models, base, concepts, probes, depth, base_probes, all_models)
        return [r for r in rows if r.prompt_index in set(prompt_indices)]
    all_models = list(models) if all_models is None else all_models
    rows = []
    for model in models:
        model_identity = model.identity()
        for probe in probes:
            probe_class = get_probe_class(probe.name)
            base_identity = base.identity() if "base_model" in probe_class.requires else None
            cells = model_cells(model, probe.name, concepts, all_models, base_probes)
            probe_instance = probe_class()
            for params, cell in product(probe_instance.expand_params(probe.params), cells):
                params_json = params.canonical_json()
                made_by = probe_instance.row_identity(cell.concept, params)
                # What made the row beyond its params replaces the params it came from (a classifier's
                # content hash, not its folder), so retraining into the same folder changes the identity.
                identity_params = (params_json if not made_by else json.dumps(
                    {k: v for k, v in json.loads(params_json).items() if k not in probe_class.identity_excludes},
                    sort_keys=True, separators=(",", ":")))
                if cell.reference:
                    prompts = probe_class().reference_prompts(cell.concept, num_images, params)
                else:
                    prompts = probe_class().work_prompts(cell.concept, cell.universe, num_images, params)
                for target, index, prompt, seed in prompts:
                    identity = {
                        "model": model_identity,
                        "base": base_identity,
                        "concept": cell.concept.name,
                        "target_concept": target,
                        "probe": probe.name,
                        "params": identity_params,
                        "prompt": prompt,
                        "prompt_index": index,
                        "seed": seed,
                        **made_by,
                    }
                    rows.append(
                        WorkRow(
                            row_id=row_id(identity),
                            model=model.name,
                            method=model.method_label,
                            concept=cell.concept.name,
                            target_concept=target,
                            probe=probe.name,
                            params=params_json,
                            prompt=prompt,
                            prompt_index=index,
                            seed=seed,
                            role=cell.role,
                            erased=tuple(model.erased),
                            classifier_hash=made_by.get("classifier_hash"),
                        )
                    )
    return rows


def row_id(identity: dict[str, Any]) -> str:
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def pending_rows(rows: list[WorkRow], finished_ids: set[str]) -> list[WorkRow]:
    return [r for r in rows if r.row_id not in finished_ids]


def work_units(rows: list[WorkRow], batch_size: int) -> list[list[WorkRow]]:
    """Rows sharing (model, probe, params) cut into units of at most `batch_size`. The units are
    fixed in the driver, so the same command always batches the same rows together and gives
    byte-identical images. Units of one model stay adjacent so an actor loads it once."""
    units: list[list[WorkRow]] = []

    def key(r: WorkRow):
        return (r.model, r.probe, r.params)

    for _, grouped in groupby(sorted(rows, key=key), key=key):
        group = list(grouped)
        units.extend(group[start : start + batch_size] for start in range(0, len(group), batch_size))
    return units
