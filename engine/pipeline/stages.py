"""Ray Data UDF classes. ProbeActor turns work units into result rows with PNG images; ScoreActor
judges them (engine.scoring) in the same stream.

A unit is a list of rows sharing (model, probe, params), fixed by the driver. The actor keeps a
ModelCache, so each model's base components load once per actor and erased UNets are swapped in.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import pyarrow as pa
import torch

from engine import __version__
from engine.concepts import ConceptSpec
from engine.config import ModelSpec
from engine.models import ModelCache, resolve_device
from engine.probe import ProbeBatch, ProbeContext, WorkRow, get_probe_class
from engine.results import CANDIDATE_IMAGES, ROW_SCHEMA, STREAM_SCHEMA, encode_png, rows_table
from engine.scoring.registry import JudgeRequest, judge_requests
from engine.scoring.scorer import Scorer
from engine.scoring.selectors import SelectorBank
from engine.storage import cache_folder

logger = logging.getLogger(__name__)


def actor_payload(plan, device: str, attention: str, torch_threads: int | None, cache_dir: str) -> dict[str, Any]:
    """Everything an actor needs, as plain JSON-able data (it crosses process boundaries)."""
    return {
        "models": {m.name: m.model_dump(mode="json") for m in plan.models},
        "base": plan.base.model_dump(mode="json") if plan.base else None,
        "concepts": {k: v.model_dump(mode="json") for k, v in plan.concepts.items()},
        "device": device,
        "attention": attention,
        "torch_threads": torch_threads,
        "cache_dir": cache_dir,
        # The run's judges: the probe actor's selectors reuse them (selector judge / clip).
        "judges": [r.model_dump(mode="json") for r in judge_requests(plan.spec.judges)],
    }


class ProbeRunner:
    """Runs units in-process. Ray-free, so tests and the actor share one code path."""

    def __init__(self, payload: dict[str, Any]):
        threads = payload.get("torch_threads") or os.cpu_count() or 1
        self.device = resolve_device(payload["device"])
        if self.device.type == "cpu":
            torch.set_num_threads(threads)
        self.models = {name: ModelSpec(**spec) for name, spec in payload["models"].items()}
        self.base = ModelSpec(**payload["base"]) if payload.get("base") else None
        self.concepts = {name: ConceptSpec(**spec) for name, spec in payload["concepts"].items()}
        self.cache = ModelCache(self.device, payload.get("attention", "sdpa"))
        self.cache_dir = cache_folder(payload["cache_dir"])  # OUTPUT/cache, or this node's temp folder
        self.unit_options: dict[str, Any] = {}
        self.probes: dict[str, Any] = {}
        self.judges = [JudgeRequest(**j) for j in payload.get("judges", [])]
        self.selectors = SelectorBank(self.judges, self.concepts, self.device, self.context)
        # With judges, a score stage follows and judges the candidates; without, none would read them.
        self.output_schema = STREAM_SCHEMA if self.judges else ROW_SCHEMA

    def context(self) -> ProbeContext:
        return ProbeContext(
            device=self.device,
            base_pipeline=self._base_pipeline,
            concept=self.concepts.__getitem__,
            cache_dir=self.cache_dir,
            options=dict(self.unit_options),
            selector_scores=self.selectors.scores,
        )

    def _base_pipeline(self):
        if self.base is None:
            raise RuntimeError("this probe needs the base model, but the run did not resolve one")
        return self.cache.pipeline(self.base)

    def run_unit(self, rows: list[WorkRow]) -> list[dict[str, Any]]:
        first = rows[0]
        if first.probe not in self.probes:
            self.probes[first.probe] = get_probe_class(first.probe)()
        probe = self.probes[first.probe]
        params = probe.params_class.model_validate_json(first.params)
        # The latent-classifier selector looks where the probe's own classifiers live, if it has any.
        self.unit_options = {"classifier_dir": getattr(params, "classifier_dir", None)}
        pipeline = self.cache.pipeline(self.models[first.model])
        started = time.perf_counter()
        self.selectors.take_used()  # forget selectors of an earlier unit that failed midway
        output = probe.run(ProbeBatch(rows=rows, params=params, pipeline=pipeline, context=self.context()))
        seconds = (time.perf_counter() - started) / len(rows)
        # The selectors the probe called (with their models); else the one its params name, if any.
        selector = self.selectors.take_used() or getattr(params, "selector", None)
        if len(output.images) != len(rows):
            raise RuntimeError(f"probe {first.probe} returned {len(output.images)} images for {len(rows)} rows")
        records = []
        for row, image, extras, region, candidates in zip(
            rows, output.images, output.extras, output.scoring_regions, output.candidates
        ):
            records.append(
                {
                    **row.__dict__,
                    "image": encode_png(image),
                    "image_width": int(image.shape[1]),
                    "image_height": int(image.shape[0]),
                    "scoring_region": list(region) if region is not None else None,
                    "extras": json.dumps(extras, sort_keys=True, default=float),
                    "generation_seconds": seconds,
                    "device": str(self.device),
                    "engine_version": __version__,
                    "selector": selector,
                    "candidate_count": len(candidates) if candidates else None,
                    CANDIDATE_IMAGES: [encode_png(c) for c in candidates] if candidates and self.judges else None,
                }
            )
        return records


class ProbeActor:
    """Ray Data callable class: a batch of work units in, a table of result rows out."""

    def __init__(self, payload: dict[str, Any]):
        logging.basicConfig(level=logging.INFO)
        self.runner = ProbeRunner(payload)

    def __call__(self, batch: dict[str, Any]) -> pa.Table:
        records = []
        for unit in batch["unit"]:
            rows = [WorkRow(**r) for r in json.loads(str(unit))]
            records.extend(self.runner.run_unit(rows))
        return rows_table(records, self.runner.output_schema)


def score_payload(plan, device: str, torch_threads: int | None) -> dict[str, Any]:
    """What a ScoreActor needs, as plain JSON-able data."""
    return {
        "judges": [r.model_dump(mode="json") for r in judge_requests(plan.spec.judges)],
        "concepts": {k: v.model_dump(mode="json") for k, v in plan.concepts.items()},
        "device": device,
        "batch_size": plan.spec.score_batch_size,
        "torch_threads": torch_threads,
    }


class ScoreActor:
    """Ray Data callable class: generated rows in, the same rows with judge scores out."""

    def __init__(self, payload: dict[str, Any]):
        logging.basicConfig(level=logging.INFO)
        device = resolve_device(payload["device"])
        if device.type == "cpu":
            # A light stage beside the probe actors: few threads, so it never starves generation.
            torch.set_num_threads(payload.get("torch_threads") or 1)
        concepts = {name: ConceptSpec(**spec) for name, spec in payload["concepts"].items()}
        judges = [JudgeRequest(**j) for j in payload["judges"]]
        self.scorer = Scorer.from_requests(judges, concepts, device, payload["batch_size"])

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.scorer.score_table(batch)
