"""One Tune trial, Ray-free: a probe setting generated and scored on the pair's fixed prompt/seed set.

Pipelines are loaded once per trial process, not once per trial: Tune reuses actors
(TuneConfig(reuse_actors=True)) and this module keeps a TrialEvaluator (ProbeRunner with its
ModelCache, plus the judges) per process. Every trial reports whether it loaded anything, so the
reuse is measured in trials.parquet (`pipeline_loaded`, `setup_seconds`, `process_trial_index`).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from engine.metrics.columns import metric as metric_of
from engine.metrics.stats import mean_interval, rate_interval
from engine.pipeline.grid import ProbeChoice, expand_rows, work_units
from engine.probe import ProbeParams, WorkRow
from engine.specs.concepts import ConceptSpec
from engine.specs.runs import ModelSpec
from engine.tune.pairs import METRIC
from engine.tune.space import OBJECTIVES, SearchSpace

if TYPE_CHECKING:
    from engine.pipeline.stages import ProbeStageConfig


@dataclass(frozen=True)
class TrialSetup:
    """What a trial actor needs, as plain picklable data (bound into the trainable, see _bound_trial)."""

    config: ProbeStageConfig  # the stream's probe stage config: models, concepts, device, judges
    model: ModelSpec
    base: ModelSpec | None
    concept: ConceptSpec
    probe: str
    num_images: int
    batch_size: int
    score_batch_size: int
    space: SearchSpace
    objective: str

    def key(self) -> str:
        return json.dumps([self.config.model_dump(mode="json"), self.score_batch_size], sort_keys=True)


@dataclass
class ObjectiveTally:
    """Running objective over the rows scored so far, with its 95% interval."""

    objective: str
    values: dict[str, list[float]] = field(default_factory=lambda: {c: [] for c in OBJECTIVES})

    def add(self, table: pa.Table) -> None:
        for column, values in self.values.items():
            values.extend(float(v) for v in table.column(column).to_pylist() if v is not None)

    def metrics(self) -> dict[str, float]:
        values = self.values[self.objective]
        n = len(values)
        if OBJECTIVES[self.objective][0] == "rate":
            hits = int(sum(values))
            low, high = rate_interval(hits, n, metric_of(self.objective).interval)
            metric = hits / n if n else None
        else:
            hits = None
            metric, low, high = mean_interval(values, metric_of(self.objective).bounds)
        means = {metric_of(c).value: _num(sum(v) / len(v) if v else None) for c, v in self.values.items()}
        return {METRIC: _num(metric), "ci_low": _num(low), "ci_high": _num(high), "n": n, "hits": _num(hits), **means}


def _num(value) -> float:
    """Tune results hold numbers; a missing value travels as NaN and is written as null."""
    return float("nan") if value is None else float(value)


class TrialEvaluator:
    """Generates and scores one trial's rows in-process. Built once per actor process and kept
    across trials (see worker_evaluator), so the pipelines and judges load once."""

    def __init__(self, setup: TrialSetup):
        from engine.pipeline.stages import ProbeRunner
        from engine.scoring.scorer import Scorer

        self.setup = setup
        self.runner = ProbeRunner(setup.config)
        concepts = {setup.concept.name: setup.concept}
        self.scorer = Scorer.from_requests(setup.config.judges, concepts, self.runner.device, setup.score_batch_size)
        self.trials_run = 0
        self.loaded = False

    def warm(self) -> tuple[bool, float]:
        """Load the pipeline(s) and judges if this process has not yet: (loaded now, seconds)."""
        if self.loaded:
            return False, 0.0
        started = time.perf_counter()
        self.runner.cache.pipeline(self.setup.model)
        if self.setup.base is not None:
            self.runner.cache.pipeline(self.setup.base)
        for judge in self.scorer.judges:
            judge.ensure_loaded()
        self.loaded = True
        return True, time.perf_counter() - started

    def rows(self, params: ProbeParams) -> list[WorkRow]:
        """The trial's rows: exactly those `engine run` makes for this model, concept and params."""
        setup = self.setup
        concepts = {setup.concept.name: setup.concept}
        return expand_rows([setup.model], setup.base, concepts, [ProbeChoice(setup.probe, params)], setup.num_images)

    def held_out_rows(self, params: ProbeParams) -> list[WorkRow]:
        """The same probe and params on the held-out prompts (engine.tune.pairs.held_out_prompts):
        as many as a trial's, none of whose seeds a trial used; the rows `engine run` makes with
        `prompt_indices` set to them (as the best config is written)."""
        from engine.tune.pairs import held_out_indices

        setup = self.setup
        concepts = {setup.concept.name: setup.concept}
        return expand_rows([setup.model], setup.base, concepts, [ProbeChoice(setup.probe, params)], setup.num_images,
                           prompt_indices=held_out_indices(setup.concept, setup.num_images))

    def evaluate(self, params: ProbeParams, rows: list[WorkRow] | None = None) -> Iterator[dict[str, float]]:
        """Metrics after each batch of rows (the same batches `engine run` cuts), generated and
        scored by the functions the run's stages call (ProbeRunner.generate, Scorer.score_table);
        `rows`: other rows than the trial's (the held-out re-run)."""
        from engine.results import rows_table

        self.trials_run += 1
        tally = ObjectiveTally(self.setup.objective)
        generation = scoring = 0.0
        scored = 0
        for unit in work_units(self.rows(params) if rows is None else rows, self.setup.batch_size):
            started = time.perf_counter()
            outcome = self.runner.generate(unit)
            if outcome.failures:
                # A trial's metric over fewer rows would not compare with the others': it fails.
                first = outcome.failures[0]
                raise RuntimeError(f"{len(outcome.failures)} row(s) failed, e.g. seed {first.row.seed}: "
                                   f"{first.error_type}: {first.message}")
            middle = time.perf_counter()
            table = self.scorer.score_table(rows_table(outcome.records, self.runner.output_schema))
            generation += middle - started
            scoring += time.perf_counter() - middle
            tally.add(table)
            scored += len(unit)
            yield {**tally.metrics(), "images_scored": scored, "generation_seconds": generation,
                   "scoring_seconds": scoring}


# One evaluator per actor process, kept across the trials a reused actor runs.
_EVALUATORS: dict[str, TrialEvaluator] = {}


def worker_evaluator(setup: TrialSetup) -> tuple[TrialEvaluator, bool, float]:
    """The process's evaluator for `setup` (built on first use): (evaluator, loaded now, seconds)."""
    key = setup.key()
    started = time.perf_counter()
    if key not in _EVALUATORS:
        _EVALUATORS.clear()  # an actor serves one search; never hold two models' pipelines
        _EVALUATORS[key] = TrialEvaluator(setup)
    evaluator = _EVALUATORS[key]
    loaded, _ = evaluator.warm()
    return evaluator, loaded, time.perf_counter() - started


def tune_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """The Tune trainable: evaluate one setting, reporting after each batch (for ASHA)."""
    from ray import tune

    started = time.perf_counter()
    evaluator, loaded, setup_seconds = worker_evaluator(setup)
    params = setup.space.params_for(config)
    for metrics in evaluator.evaluate(params):
        tune.report({
            **metrics,
            "trial_seconds": time.perf_counter() - started,
            "setup_seconds": setup_seconds,
            "pipeline_loaded": int(loaded),
            "process_trial_index": evaluator.trials_run,
            "worker_pid": os.getpid(),
        })


def held_out_trial(config: dict[str, Any], setup: TrialSetup) -> dict[str, Any]:
    """The best setting of a search re-run on the held-out prompts: its final metrics, and the
    held-out rows' prompt indices and seeds (a Ray task, with a trial's resources)."""
    started = time.perf_counter()
    evaluator, _, _ = worker_evaluator(setup)
    params = setup.space.params_for(config)
    rows = evaluator.held_out_rows(params)
    metrics: dict[str, Any] = {}
    for metrics in evaluator.evaluate(params, rows):  # noqa: B007 (the last report is the result)
        pass
    return {**metrics, "seconds": time.perf_counter() - started,
            "prompt_indices": sorted({r.prompt_index for r in rows}), "seeds": sorted({r.seed for r in rows})}
