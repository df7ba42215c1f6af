"""`engine tune`: Ray Tune search over a probe's params for the setting that recovers the concept most.

One search per (model, concept) pair; the pairs' searches run together as Ray tasks, so on a
cluster they share its GPUs. A trial is one probe setting evaluated on a fixed prompt/seed set
(the concept's first `num_images` sampled prompts, exactly the rows `engine run` makes), scored
by the run's judges; the same params always give the same metric. Objective: judge top-1 rate
(Wilson 95% interval), or the mean target-class probability or CLIP score (Student-t interval).

Pipelines are loaded once per trial actor, not once per trial: TuneConfig(reuse_actors=True)
keeps a finished trial's actor for the next one, and the actor's process keeps a TrialEvaluator
(ProbeRunner with its ModelCache, plus the judges) in a module-level cache. Every trial reports
whether it loaded anything, how long that took, and its process's trial count, so the reuse is
measured in trials.parquet (`pipeline_loaded`, `setup_seconds`, `process_trial_index`).

Outputs: OUTPUT/trials.parquet (one row per trial), OUTPUT/best_<model>_<concept>.yaml (a run
config `engine run` accepts as is), OUTPUT/tune/ (Ray Tune's experiment state).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from engine.config import ConceptSpec, ModelSpec, run_spec_from_dict
from engine.errors import UserError
from engine.grid import ProbeChoice, expand_rows, plan_run, work_units
from engine.probe import ProbeParams, WorkRow
from engine.report_stats import mean_interval, wilson_interval
from engine.scoring.preflight import check_run_scoring
from engine.scoring.registry import get_judge_class, judge_requests
from engine.tune_space import OBJECTIVES, SearchSpace, TuneSpec, parse_space

logger = logging.getLogger(__name__)

TRIALS_FILE = "trials.parquet"
METRIC = "objective"  # the key every trial reports its objective under (TuneConfig metric)
TPE_MAX_CONCURRENT = 4  # TPE learns from finished trials; many pending ones make it a random search


# --------------------------------------------------------------------------- driver-side plan


@dataclass
class PairJob:
    """One (model, concept) search, validated against the run config `engine run` would read."""

    model_ref: str | dict[str, Any]
    model: ModelSpec
    concept: ConceptSpec
    plan: Any  # engine.grid.RunPlan of the run config with the space's first corner
    rows_per_trial: int


@dataclass
class TunePlan:
    spec: TuneSpec
    space: SearchSpace
    jobs: list[PairJob]
    output: Path


def plan_tune(spec: TuneSpec, where: str = "tune config") -> TunePlan:
    """Check everything a search needs before Ray or any model starts. Raises UserError."""
    if not spec.models:
        raise UserError(f"{where}: no model to tune: give --model or `models:`")
    if not spec.concepts:
        raise UserError(f"{where}: no concept to tune: give --concept or `concepts:`")
    space = parse_space(spec, where)
    output = Path(spec.output).expanduser().resolve()
    if (output / TRIALS_FILE).exists():
        raise UserError(f"{output / TRIALS_FILE} exists from an earlier search; choose another --output or delete it")
    corner = {dim.key: dim.bounds()[0] for dim in space.dimensions}
    jobs = []
    for model_ref in spec.models:
        for concept in spec.concepts:
            ref = model_ref if isinstance(model_ref, str) else model_ref.model_dump(mode="json")
            data = run_data(spec, ref, concept, space.raw_params(corner), output)
            plan = plan_run(run_spec_from_dict(data, where))
            check_run_scoring(plan.spec, plan.concepts, [p.params for p in plan.probes])
            _check_objective(spec, plan, where)
            jobs.append(PairJob(ref, plan.models[0], plan.concepts[concept], plan, len(plan.rows)))
    if spec.scheduler is not None and spec.scheduler.grace_period >= min(j.rows_per_trial for j in jobs):
        raise UserError(
            f"{where}: scheduler.grace_period {spec.scheduler.grace_period} must be below the images per trial "
            f"({min(j.rows_per_trial for j in jobs)}), or no trial can be stopped early"
        )
    return TunePlan(spec, space, jobs, output)


def run_data(spec: TuneSpec, model_ref, concept: str, params: dict[str, Any], output: Path) -> dict[str, Any]:
    """The run config of one (model, concept) pair with `params`: what `engine run` reads."""
    model_name = model_ref if isinstance(model_ref, str) else model_ref["name"]
    data: dict[str, Any] = {
        "output": str(output / f"best_{_slug(model_name)}_{_slug(concept)}"),
        "models": [model_ref],
        "base_model": spec.base_model,
        "concepts": [concept],
        "probes": [{"name": spec.probe, "params": params}],
        "num_images": spec.num_images,
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


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"


def _check_objective(spec: TuneSpec, plan, where: str) -> None:
    slot = OBJECTIVES[spec.objective][1]
    requests = [r for r in judge_requests(plan.spec.judges) if get_judge_class(r.name).slot == slot]
    if not requests:
        raise UserError(f"{where}: objective {spec.objective} needs a {slot} judge in `judges:`; the run has none")
    classes_key = getattr(get_judge_class(requests[0].name), "classes_key", None)
    for concept in plan.concepts.values():
        if classes_key is not None and classes_key not in concept.judge_classes:
            raise UserError(
                f"concept {concept.name!r} has no judge_classes.{classes_key}, so {spec.objective} is never "
                "measured for it (a style?); tune it with --objective clip_score"
            )


# --------------------------------------------------------------------------- trial side (Ray-free)


@dataclass(frozen=True)
class TrialSetup:
    """What a trial actor needs, as plain picklable data (bound into the trainable, see _bound_trial)."""

    payload: dict[str, Any]  # engine.stages ProbeRunner payload: models, concepts, device, judges
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
        return json.dumps([self.payload, self.score_batch_size], sort_keys=True)


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
            low, high = wilson_interval(hits, n)
            metric = hits / n if n else None
        else:
            hits = None
            metric, low, high = mean_interval(values)
            if self.objective == "judge_target_prob" and low is not None:
                low, high = max(0.0, low), min(1.0, high)  # a probability: the t interval can overshoot
        means = {c: (sum(v) / len(v) if v else None) for c, v in self.values.items()}
        return {
            METRIC: _num(metric), "ci_low": _num(low), "ci_high": _num(high), "n": n, "hits": _num(hits),
            "top1_rate": _num(means["judge_top1"]), "target_prob_mean": _num(means["judge_target_prob"]),
            "clip_mean": _num(means["clip_score"]),
        }


def _num(value) -> float:
    """Tune results hold numbers; a missing value travels as NaN and is written as null."""
    return float("nan") if value is None else float(value)


class TrialEvaluator:
    """Generates and scores one trial's rows in-process. Built once per actor process and kept
    across trials (see worker_evaluator), so the pipelines and judges load once."""

    def __init__(self, setup: TrialSetup):
        from engine.scoring.registry import JudgeRequest
        from engine.scoring.scorer import Scorer
        from engine.stages import ProbeRunner

        self.setup = setup
        self.runner = ProbeRunner(setup.payload)
        judges = [JudgeRequest(**j) for j in setup.payload.get("judges", [])]
        concepts = {setup.concept.name: setup.concept}
        self.scorer = Scorer.from_requests(judges, concepts, self.runner.device, setup.score_batch_size)
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

    def evaluate(self, params: ProbeParams) -> Iterator[dict[str, float]]:
        """Metrics after each batch of rows (the same batches `engine run` cuts)."""
        from engine.results import rows_table

        self.trials_run += 1
        tally = ObjectiveTally(self.setup.objective)
        generation = scoring = 0.0
        scored = 0
        for unit in work_units(self.rows(params), self.setup.batch_size):
            rows = [WorkRow(**r) for r in json.loads(unit["unit"])]
            started = time.perf_counter()
            records = self.runner.run_unit(rows)
            middle = time.perf_counter()
            table = self.scorer.score_table(rows_table(records, self.runner.output_schema))
            generation += middle - started
            scoring += time.perf_counter() - middle
            tally.add(table)
            scored += len(rows)
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


# --------------------------------------------------------------------------- search (runs in a Ray task)


@dataclass(frozen=True)
class SearchSettings:
    algorithm: str
    num_samples: int
    seed: int
    startup_trials: int
    grid_points: int
    scheduler: dict[str, Any] | None
    max_t: int
    resources: dict[str, float]
    max_concurrent: int
    storage_path: str
    experiment: str
    reuse_actors: bool
    torch_threads: int | None
    multivariate: bool = True


def build_search(space: SearchSpace, settings: SearchSettings):
    """(param_space, search_alg, num_samples, max_concurrent_trials for TuneConfig) of an algorithm."""
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if settings.algorithm == "grid":
        param_space = {key: tune.grid_search(values) for key, values in space.grid(settings.grid_points).items()}
        return param_space, BasicVariantGenerator(max_concurrent=settings.max_concurrent), 1, None
    param_space = {dim.key: ray_domain(dim) for dim in space.dimensions}
    if settings.algorithm == "random":
        search = BasicVariantGenerator(max_concurrent=settings.max_concurrent, random_state=settings.seed)
        return param_space, search, settings.num_samples, None
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # Multivariate TPE models the params jointly: recovery ridges (the best v moves with eta)
        # are what independent per-parameter densities miss (benchmarks/tune_tpe_vs_grid.py).
        sampler = optuna.samplers.TPESampler(seed=settings.seed, n_startup_trials=settings.startup_trials,
                                             multivariate=settings.multivariate)
    return param_space, OptunaSearch(sampler=sampler), settings.num_samples, settings.max_concurrent


def ray_domain(dim):
    from ray import tune

    if dim.distribution == "choice":
        return tune.choice(list(dim.values))
    if dim.distribution == "int":
        return tune.randint(int(dim.low), int(dim.high) + 1)  # Tune's upper bound is exclusive
    if dim.distribution == "logint":
        return tune.lograndint(int(dim.low), int(dim.high) + 1)
    if dim.distribution == "loguniform":
        return tune.loguniform(dim.low, dim.high)
    return tune.uniform(dim.low, dim.high)


def search_pair(setup: TrialSetup, settings: SearchSettings, trainable=None) -> list[dict[str, Any]]:
    """Run one (model, concept) search with Ray Tune; one record per trial. `trainable` replaces
    tune_trial (the synthetic-surface benchmark)."""
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # with verbose=0, no tables on the terminal
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    trainable = tune.with_resources(_bound_trial(trainable or tune_trial, setup, settings.experiment),
                                    settings.resources)
    param_space, search_alg, num_samples, max_concurrent = build_search(setup.space, settings)
    scheduler = None
    if settings.scheduler:
        scheduler = ASHAScheduler(time_attr="images_scored", max_t=settings.max_t,
                                  grace_period=settings.scheduler["grace_period"],
                                  reduction_factor=settings.scheduler["reduction_factor"])
    tuner = tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=METRIC, mode="max", search_alg=search_alg, scheduler=scheduler, num_samples=num_samples,
            max_concurrent_trials=max_concurrent, reuse_actors=settings.reuse_actors,
        ),
        run_config=tune.RunConfig(storage_path=settings.storage_path, name=settings.experiment, verbose=0),
    )
    results = tuner.fit()
    return [_trial_record(index, result, setup, settings) for index, result in enumerate(results)]


def _bound_trial(function, setup: TrialSetup, experiment: str):
    """`function` with `setup` bound, under a name unique to this search. Tune registers trainables
    (and tune.with_parameters' objects) cluster-wide by name and by str(function); two searches
    running together in one job would otherwise overwrite each other's setup, and a trial of one
    pair would evaluate the other pair's model."""

    def trial(config: dict[str, Any]) -> None:
        return function(config, setup)

    trial.__name__ = trial.__qualname__ = f"tune_trial_{_slug(experiment)}_{uuid.uuid4().hex[:8]}"
    return trial


def _trial_record(index: int, result, setup: TrialSetup, settings: SearchSettings) -> dict[str, Any]:
    metrics = result.metrics or {}
    config = {dim.key: (result.config or {}).get(dim.key) for dim in setup.space.dimensions}
    error = None if result.error is None else (str(result.error).strip().splitlines() or ["error"])[-1][:500]
    if error is not None:
        status = "error"
    elif metrics.get("images_scored", 0) < settings.max_t:
        status = "stopped"  # by the early-stopping scheduler, on fewer images
    else:
        status = "complete"
    record = {
        "trial_index": index,
        "trial_id": metrics.get("trial_id"),
        "status": status,
        "params": setup.space.row_params_json(config) if None not in config.values() else None,
        "searched": json.dumps(config, sort_keys=True, default=float),
        "error": error,
    }
    for key in ["objective", "ci_low", "ci_high", "n", "hits", "top1_rate", "target_prob_mean", "clip_mean",
                "images_scored", "trial_seconds", "setup_seconds", "generation_seconds", "scoring_seconds",
                "pipeline_loaded", "process_trial_index", "worker_pid"]:
        value = metrics.get(key)
        record[key] = None if value is None or (isinstance(value, float) and math.isnan(value)) else value
    for dim in setup.space.dimensions:
        record[f"param_{dim.key}"] = config[dim.key]
    return record


# --------------------------------------------------------------------------- driver: run every pair


@dataclass
class PairOutcome:
    model: str
    concept: str
    trials: int
    best: dict[str, Any] | None
    best_config: Path | None
    pipeline_loads: int
    worker_processes: int
    first_trial_seconds: float | None  # mean over trials that were their process's first
    later_trial_seconds: float | None  # mean over trials on an already warm process


@dataclass
class TuneSummary:
    output: Path
    trials_path: Path
    pairs: list[PairOutcome]
    seconds: float


def execute_tune(plan: TunePlan, cluster: str | None = None) -> TuneSummary:
    """Run every pair's search (together, as Ray tasks), write trials.parquet and the best configs."""
    from engine.run import ray_session
    from engine.stages import actor_payload

    started = time.perf_counter()
    spec = plan.spec
    plan.output.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    outcomes: list[PairOutcome] = []
    with ray_session(cluster) as ray:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        resources, device, threads, max_concurrent = _trial_resources(ray, spec)
        # The searches' drivers stay on this node, so Tune's state lands in OUTPUT/tune here; the
        # trials themselves go wherever the cluster has room. A search task holds no CPU.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        remote = ray.remote(num_cpus=0, max_retries=0)(search_pair).options(scheduling_strategy=here)
        futures = {}
        for job in plan.jobs:
            payload = actor_payload(job.plan, device, spec.attention, threads, str(plan.output / "cache"))
            setup = TrialSetup(payload, job.model, job.plan.base, job.concept, spec.probe, spec.num_images,
                               spec.batch_size, spec.score_batch_size, plan.space, spec.objective)
            settings = _settings(spec, job, resources, max_concurrent, threads, plan.output)
            logger.info("searching %s x %s: %s", job.model.name, job.concept.name, settings)
            futures[remote.remote(setup, settings)] = job
        while futures:
            done, _ = ray.wait(list(futures), num_returns=1)
            job = futures.pop(done[0])
            try:
                trials = ray.get(done[0])
            except Exception as error:  # a failed search (not a failed trial: those are recorded)
                raise RuntimeError(f"search {job.model.name} x {job.concept.name} failed: {error}") from None
            for trial in trials:
                trial.update(model=job.model.name, method=job.model.method, concept=job.concept.name,
                             probe=spec.probe, algorithm=spec.algorithm, objective_name=spec.objective)
            records.extend(trials)
            write_trials(plan.output / TRIALS_FILE, records)
            outcomes.append(_finish_pair(plan, job, trials, threads))
    failed = [o for o in outcomes if o.best is None]
    if failed:
        first = next((r["error"] for r in records if r["error"]), "no trial scored every image")
        names = ", ".join(f"{o.model} x {o.concept}" for o in failed)
        raise RuntimeError(f"no complete trial for {names}; first error: {first} (see {plan.output / TRIALS_FILE})")
    return TuneSummary(plan.output, plan.output / TRIALS_FILE, outcomes, time.perf_counter() - started)


def _trial_resources(ray, spec: TuneSpec) -> tuple[dict[str, float], str, int | None, int]:
    cluster = ray.cluster_resources()
    total_gpus, total_cpus = float(cluster.get("GPU", 0)), float(cluster.get("CPU", 0))
    gpus = (1.0 if total_gpus else 0.0) if spec.gpus_per_trial == "auto" else float(spec.gpus_per_trial)
    if gpus > total_gpus or spec.cpus_per_trial > total_cpus:
        raise UserError(
            f"a trial asks for {spec.cpus_per_trial:g} CPU and {gpus:g} GPU; the cluster has {total_cpus:g} CPU "
            f"and {total_gpus:g} GPU, so no trial could start"
        )
    device = spec.device if spec.device != "auto" else ("cuda" if gpus > 0 else "cpu")
    threads = spec.torch_threads or (max(1, int(spec.cpus_per_trial)) if device == "cpu" else None)
    slots = int(total_gpus // gpus) if gpus > 0 else int(total_cpus // spec.cpus_per_trial)
    if spec.max_concurrent_trials == "auto":
        max_concurrent = max(1, min(slots, TPE_MAX_CONCURRENT) if spec.algorithm == "tpe" else slots)
    else:
        max_concurrent = spec.max_concurrent_trials
    return {"cpu": spec.cpus_per_trial, "gpu": gpus}, device, threads, max_concurrent


def _settings(spec: TuneSpec, job: PairJob, resources, max_concurrent: int, threads: int | None,
              output: Path) -> SearchSettings:
    startup = spec.startup_trials or max(2, min(10, spec.num_samples // 4))
    scheduler = spec.scheduler.model_dump() if spec.scheduler else None
    return SearchSettings(
        algorithm=spec.algorithm, num_samples=spec.num_samples, seed=spec.seed, startup_trials=startup,
        grid_points=spec.grid_points, scheduler=scheduler, max_t=job.rows_per_trial, resources=resources,
        max_concurrent=max_concurrent, storage_path=str(output / "tune"),
        experiment=f"{_slug(job.model.name)}_{_slug(job.concept.name)}_{time.strftime('%Y%m%d-%H%M%S')}",
        reuse_actors=spec.reuse_actors, torch_threads=threads,
    )


def _finish_pair(plan: TunePlan, job: PairJob, trials: list[dict[str, Any]], threads: int | None) -> PairOutcome:
    complete = [t for t in trials if t["status"] == "complete" and t["objective"] is not None]
    best = None
    path = None
    if complete:
        # Highest metric; among equals the tighter lower bound, then the earlier trial.
        best = max(complete, key=lambda t: (t["objective"], t["ci_low"] or -math.inf, -t["trial_index"]))
        path = write_best_config(plan, job, best, threads)
    ran = [t for t in trials if t["process_trial_index"] is not None]
    first = [t["trial_seconds"] for t in ran if t["pipeline_loaded"]]
    later = [t["trial_seconds"] for t in ran if not t["pipeline_loaded"]]
    return PairOutcome(
        model=job.model.name, concept=job.concept.name, trials=len(trials), best=best, best_config=path,
        pipeline_loads=sum(int(t["pipeline_loaded"]) for t in ran),
        worker_processes=len({t["worker_pid"] for t in ran}),
        first_trial_seconds=sum(first) / len(first) if first else None,
        later_trial_seconds=sum(later) / len(later) if later else None,
    )


def write_best_config(plan: TunePlan, job: PairJob, best: dict[str, Any], threads: int | None) -> Path:
    """OUTPUT/best_<model>_<concept>.yaml: the pair's run config with the best params."""
    config = {dim.key: best[f"param_{dim.key}"] for dim in plan.space.dimensions}
    data = run_data(plan.spec, job.model_ref, job.concept.name, plan.space.raw_params(config), plan.output)
    if threads is not None:
        # CPU kernels sum in a thread-count-dependent order: the trials' thread count makes the
        # run's scores equal the trial's to the last bit.
        data["torch_threads"] = threads
    # The judges the trials were scored with, spelled out, so the run scores the same way.
    data["judges"] = [r.label() if not r.options else r.model_dump(mode="json", exclude_none=True)
                      for r in judge_requests(job.plan.spec.judges)]
    run_spec_from_dict(data, "best config")  # `engine run` must accept it as is
    path = plan.output / f"best_{_slug(job.model.name)}_{_slug(job.concept.name)}.yaml"
    interval = f"[{_fmt(best['ci_low'])}, {_fmt(best['ci_high'])}]"
    header = (
        f"# engine tune: best of {plan.spec.algorithm} search for {job.model.name} x {job.concept.name}, "
        f"probe {plan.spec.probe}\n# {plan.spec.objective} = {_fmt(best['objective'])} {interval} on "
        f"n = {best['n']} images (trial {best['trial_index']}); run it with `engine run {path.name}`\n"
    )
    path.write_text(header + yaml.safe_dump(data, sort_keys=False))
    return path


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4g}"


TRIAL_FIELDS = [
    ("model", pa.string()), ("method", pa.string()), ("concept", pa.string()), ("probe", pa.string()),
    ("algorithm", pa.string()), ("objective_name", pa.string()), ("trial_index", pa.int32()),
    ("trial_id", pa.string()), ("status", pa.string()), ("params", pa.string()), ("searched", pa.string()),
    ("objective", pa.float64()), ("ci_low", pa.float64()), ("ci_high", pa.float64()), ("n", pa.int32()),
    ("hits", pa.int32()), ("top1_rate", pa.float64()), ("target_prob_mean", pa.float64()),
    ("clip_mean", pa.float64()), ("images_scored", pa.int32()), ("trial_seconds", pa.float64()),
    ("setup_seconds", pa.float64()), ("generation_seconds", pa.float64()), ("scoring_seconds", pa.float64()),
    ("pipeline_loaded", pa.bool_()), ("process_trial_index", pa.int32()), ("worker_pid", pa.int64()),
    ("error", pa.string()),
]


def write_trials(path: Path, records: list[dict[str, Any]]) -> None:
    """One row per trial; searched values also as param_<key> columns. Written atomically."""
    columns = {name: pa.array([_cast(r.get(name), kind) for r in records], type=kind) for name, kind in TRIAL_FIELDS}
    for name in sorted({k for r in records for k in r if k.startswith("param_")}):
        values = [r.get(name) for r in records]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values if v is not None)
        columns[name] = pa.array([float(v) if v is not None else None for v in values] if numeric
                                 else [None if v is None else json.dumps(v) for v in values])
    temporary = path.with_suffix(".parquet.tmp")
    pq.write_table(pa.table(columns), temporary)
    temporary.replace(path)


def _cast(value, kind):
    if value is None:
        return None
    if pa.types.is_integer(kind):
        return int(value)
    if pa.types.is_boolean(kind):
        return bool(value)
    return value


def summary_lines(summary: TuneSummary) -> list[str]:
    """What the CLI prints: per pair the best setting with its interval, and the reuse numbers."""
    lines = []
    for pair in summary.pairs:
        best = pair.best
        interval = f"[{_fmt(best['ci_low'])}, {_fmt(best['ci_high'])}]"
        lines.append(
            f"{pair.model} x {pair.concept}: best {best['objective_name']} {_fmt(best['objective'])} {interval} "
            f"(n={best['n']}) at {best['searched']} -> {pair.best_config}"
        )
        lines.append(
            f"  {pair.trials} trials on {pair.worker_processes} worker process(es), {pair.pipeline_loads} pipeline "
            f"load(s); first trial per process {_fmt(pair.first_trial_seconds)} s, later trials "
            f"{_fmt(pair.later_trial_seconds)} s"
        )
    lines.append(f"trials: {summary.trials_path} ({summary.seconds:.1f} s)")
    return lines
