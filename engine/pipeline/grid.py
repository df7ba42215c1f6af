"""Expand a run spec into work rows, hash their identity, drop finished rows, cut work units.

One row = (model, concept, target_concept, probe, params, prompt, seed) plus a content-hash
`row_id`, so a rerun skips finished rows and nothing is written twice.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from itertools import groupby, product
from typing import Any

from engine.concepts import ConceptSpec, load_concept
from engine.config import ModelSpec, RunSpec, probe_requests
from engine.errors import UserError
from engine.models import resolve_model
from engine.probe import ProbeParams, WorkRow, get_probe_class, parse_params


@dataclass
class ProbeChoice:
    name: str
    params: ProbeParams


@dataclass
class RunPlan:
    """A validated run: everything resolved, nothing loaded."""

    spec: RunSpec
    models: list[ModelSpec]
    base: ModelSpec | None
    concepts: dict[str, ConceptSpec]
    probes: list[ProbeChoice]
    rows: list[WorkRow]

    def resolved_config(self) -> dict[str, Any]:
        return {
            "run": self.spec.model_dump(mode="json"),
            "models": [m.model_dump(mode="json") for m in self.models],
            "base_model": self.base.model_dump(mode="json") if self.base else None,
            "concepts": {k: v.model_dump(mode="json") for k, v in self.concepts.items()},
            "probes": [{"name": p.name, "params": json.loads(p.params.canonical_json())} for p in self.probes],
        }


def plan_run(spec: RunSpec, extra_models: list[ModelSpec] = ()) -> RunPlan:
    """Validate every name in the spec and expand the grid. Raises UserError on bad input."""
    models = [resolve_model(ref) for ref in spec.models] + list(extra_models)
    if not models:
        raise UserError("no model to probe: give --model, --unet or `models:` in the run file")
    concepts = {name: load_concept(name) for name in spec.concepts}
    probes = [ProbeChoice(r.name, parse_params(r.name, r.params)) for r in probe_requests(spec)]
    needs_base = any("base_model" in get_probe_class(p.name).requires for p in probes)
    base = resolve_model(spec.base_model) if needs_base else None
    for choice in probes:
        get_probe_class(choice.name)().check_request(choice.params, list(concepts), {"base": base})
    rows = expand_rows(models, base, concepts, probes, spec.num_images)
    return RunPlan(spec, models, base, concepts, probes, rows)


def expand_rows(models, base, concepts, probes, num_images) -> list[WorkRow]:
    rows = []
    for model in models:
        for probe in probes:
            probe_class = get_probe_class(probe.name)
            base_identity = base.model_dump(mode="json") if "base_model" in probe_class.requires else None
            for params, concept in product(probe_class().expand_params(probe.params), concepts.values()):
                params_json = params.canonical_json()
                for target, index, prompt, seed in probe_class().work_prompts(concept, concepts, num_images, params):
                    identity = {
                        "model": model.model_dump(mode="json"),
                        "base": base_identity,
                        "concept": concept.name,
                        "target_concept": target,
                        "probe": probe.name,
                        "params": params_json,
                        "prompt": prompt,
                        "prompt_index": index,
                        "seed": seed,
                    }
                    rows.append(
                        WorkRow(
                            row_id=row_id(identity),
                            model=model.name,
                            method=model.method,
                            concept=concept.name,
                            target_concept=target,
                            probe=probe.name,
                            params=params_json,
                            prompt=prompt,
                            prompt_index=index,
                            seed=seed,
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
    units = []

    def key(r: WorkRow):
        return (r.model, r.probe, r.params)

    for _, group in groupby(sorted(rows, key=key), key=key):
        group = list(group)
        units.extend(group[start : start + batch_size] for start in range(0, len(group), batch_size))
    return units
