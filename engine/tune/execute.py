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
config `engine run` accepts as is), OUTPUT/tune/ (Ray Tune's experiment state). OUTPUT is a local
path or a URI (s3://...), held under the output's lock (engine.lock) while the search runs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Literal

import pyarrow as pa
import yaml

from engine.errors import UserError
from engine.lock import OutputLock
from engine.metrics.columns import METRICS
from engine.pipeline.progress import Progress, progress_seconds, watched
from engine.results import table_bytes
from engine.scoring.registry import judge_requests
from engine.specs.runs import run_spec_from_dict
from engine.storage import OutputLocation
from engine.tracking.wandb_run import WandbTarget
from engine.tune.pairs import TPE_MAX_CONCURRENT, TRIALS_FILE, PairJob, TuneRun, held_out_indices, run_data, slug
from engine.tune.progress import TrialBoard, trials_per_search
from engine.tune.search import SearchSettings, search_pair
from engine.tune.space import TuneSpec
from engine.tune.trial import TrialSetup, held_out_trial

logger = logging.getLogger(__name__)


@dataclass
class PairOutcome:
    model: str
    concept: str
    trials: int
    best: dict[str, Any] | None
    best_config: str | None  # path or URI
    pipeline_loads: int
    worker_processes: int
    first_trial_seconds: float | None  # mean over trials that were their process's first
    later_trial_seconds: float | None  # mean over trials on an already warm process


@dataclass
class TuneSummary:
    output: OutputLocation
    trials_path: str
    pairs: list[PairOutcome]
    seconds: float


def execute_tune(tune_run: TuneRun, cluster: str | None = None, ship_code: bool | None = None) -> TuneSummary:
    """Run every pair's search (together, as Ray tasks), write trials.parquet and the best configs."""
    with OutputLock(tune_run.output, "engine tune"):
        return _execute_locked(tune_run, cluster, ship_code)


def _execute_locked(tune_run: TuneRun, cluster: str | None, ship_code: bool | None) -> TuneSummary:
    from engine.pipeline.run import output_placement, ray_session
    from engine.pipeline.shipping import uses_toy_weights
    from engine.pipeline.stages import ProbeStageConfig

    progress_seconds()  # a bad ENGINE_PROGRESS_SECONDS is a user error: say so before any work
    started = time.perf_counter()
    spec = tune_run.spec
    records: list[dict[str, Any]] = []
    toy_weights = any(uses_toy_weights(job.grid) for job in tune_run.jobs)
    with ray_session(cluster, ship_code, toy_weights) as ray:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        resources, device, threads, max_concurrent = _trial_resources(ray, spec)
        cache_dir = output_placement(ray, tune_run.output, cluster, spec.shared_output).cache_dir
        # The searches' drivers stay on this node, so Tune's state lands in OUTPUT/tune here; the
        # trials themselves go wherever the cluster has room. A search task holds no CPU.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        remote = ray.remote(num_cpus=0, max_retries=0)(search_pair).options(scheduling_strategy=here)
        board = ray.remote(num_cpus=0)(TrialBoard).options(scheduling_strategy=here).remote()
        futures, setups = {}, {}
        total = 0
        for job in tune_run.jobs:
            config = ProbeStageConfig.from_grid(job.grid, device, spec.attention, threads, cache_dir)
            setup = TrialSetup(config, job.model, job.grid.base, job.concept, spec.probe, spec.num_images,
                               spec.batch_size, spec.score_batch_size, tune_run.space, spec.objective)
            settings = _settings(spec, job, resources, max_concurrent, threads, tune_run.output)
            logger.info("searching %s x %s: %s", job.model.name, job.concept.name, settings)
            search = f"{job.model.name} x {job.concept.name}"
            futures[remote.remote(setup, settings, board=board, search=search)] = job
            setups[id(job)] = setup
            total += trials_per_search(spec.algorithm, spec.num_samples, tune_run.space, spec.grid_points)
        progress = Progress(total, "trials", "tune", "trials/s", live=sys.stderr.isatty())
        with watched(progress, lambda: ray.get(board.status.remote(), timeout=30)):
            searched = _collect(ray, futures, tune_run, records)
        ray.kill(board)
        if spec.held_out:
            _run_held_out(ray, tune_run, searched, setups, resources)
            write_trials(tune_run.output, records)
        outcomes = [_finish_pair(tune_run, job, trials, threads) for job, trials in searched]
    failed = [o for o in outcomes if o.best is None]
    if failed:
        first = next((r["error"] for r in records if r["error"]), "no trial scored every image")
        names = ", ".join(f"{o.model} x {o.concept}" for o in failed)
        raise RuntimeError(f"no complete trial for {names}; first error: {first} "
                           f"(see {tune_run.output.display(TRIALS_FILE)})")
    return TuneSummary(tune_run.output, tune_run.output.display(TRIALS_FILE), outcomes, time.perf_counter() - started)


def _collect(ray, futures: dict, tune_run: TuneRun, records: list[dict[str, Any]]) -> list[tuple[PairJob, list]]:
    """Each search's trials as it finishes, into trials.parquet (rewritten each time)."""
    spec = tune_run.spec
    searched = []
    while futures:
        done, _ = ray.wait(list(futures), num_returns=1)
        job = futures.pop(done[0])
        try:
            trials = ray.get(done[0])
        except Exception as error:  # noqa: BLE001 (a failed search (not a failed trial: those are recorded))
            raise RuntimeError(f"search {job.model.name} x {job.concept.name} failed: {error}") from None
        role = "recovery" if job.concept.name in job.model.erased else "unpaired"
        for trial in trials:
            trial.update(model=job.model.name, method=job.model.method_label, concept=job.concept.name,
                         role=role, probe=spec.probe, algorithm=spec.algorithm, objective_name=spec.objective)
        records.extend(trials)
        write_trials(tune_run.output, records)
        searched.append((job, trials))
    return searched


def _trial_resources(ray, spec: TuneSpec) -> tuple[dict[str, float], Literal["cpu", "cuda"], int | None, int]:
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
              output: OutputLocation) -> SearchSettings:
    startup = spec.startup_trials or max(2, min(10, spec.num_samples // 4))
    scheduler = spec.scheduler.model_dump() if spec.scheduler else None
    return SearchSettings(
        algorithm=spec.algorithm, num_samples=spec.num_samples, seed=spec.seed, startup_trials=startup,
        grid_points=spec.grid_points, scheduler=scheduler, max_t=job.rows_per_trial, resources=resources,
        max_concurrent=max_concurrent, storage_path=output.child("tune").uri,
        experiment=f"{slug(job.model.name)}_{slug(job.concept.name)}_{time.strftime('%Y%m%d-%H%M%S')}",
        reuse_actors=spec.reuse_actors, torch_threads=threads, mlflow=_mlflow(spec),
        wandb=_wandb(spec),
    )


def _mlflow(spec: TuneSpec) -> tuple[str, str] | None:
    """(absolute tracking URI, experiment) for `--track mlflow`, resolved here on the driver."""
    if "mlflow" not in spec.tracking:
        return None
    from engine.tracking.mlflow_run import EXPERIMENT, absolute_tracking_uri

    return absolute_tracking_uri(), os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT + "-tune"


def _wandb(spec: TuneSpec) -> WandbTarget | None:
    """Where `--track wandb` logs (project, mode, absolute folder), resolved here on the driver."""
    if "wandb" not in spec.tracking:
        return None
    from engine.tracking.wandb_run import wandb_target

    return wandb_target(project_suffix="-tune")


def best_trial(trials: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Highest metric; among equals the tighter lower bound, then the earlier trial."""
    complete = [t for t in trials if t["status"] == "complete" and t["objective"] is not None]
    if not complete:
        return None
    return max(complete, key=lambda t: (t["objective"], t["ci_low"] or -math.inf, -t["trial_index"]))


def _run_held_out(ray, tune_run: TuneRun, searched, setups, resources: dict[str, float]) -> None:
    """Re-run each pair's best setting on its held-out prompts (together, as Ray tasks with a
    trial's resources) and write the result into the best trial's record."""
    remote = ray.remote(num_cpus=resources["cpu"], num_gpus=resources["gpu"], max_retries=0)(held_out_trial)
    futures = {}
    for job, trials in searched:
        best = best_trial(trials)
        for trial in trials:
            trial["is_best"] = trial is best
        if best is not None:
            config = {dim.key: best[f"param_{dim.key}"] for dim in tune_run.space.dimensions}
            futures[remote.remote(config, setups[id(job)])] = (job, best)
    for future, (job, best) in futures.items():
        try:
            result = ray.get(future)
        except Exception as error:  # noqa: BLE001 (a failed re-run is reported with its pair)
            raise RuntimeError(f"held-out re-run of {job.model.name} x {job.concept.name} failed: {error}") from None
        best.update({
            "heldout_objective": _finite(result.get("objective")), "heldout_ci_low": _finite(result.get("ci_low")),
            "heldout_ci_high": _finite(result.get("ci_high")), "heldout_n": result.get("n"),
            "heldout_hits": _finite(result.get("hits")), "heldout_seconds": result.get("seconds"),
            "heldout_seeds": json.dumps(result["seeds"]),
        })


def _finite(value):
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _finish_pair(tune_run: TuneRun, job: PairJob, trials: list[dict[str, Any]], threads: int | None) -> PairOutcome:
    best = best_trial(trials)
    path = None
    if best is not None:
        path = write_best_config(tune_run, job, best, threads)
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


def write_best_config(tune_run: TuneRun, job: PairJob, best: dict[str, Any], threads: int | None) -> str:
    """OUTPUT/best_<model>_<concept>.yaml: the pair's run config with the best params."""
    config = {dim.key: best[f"param_{dim.key}"] for dim in tune_run.space.dimensions}
    # With a held-out re-run, the config evaluates the held-out prompts and seeds: `engine run` of it
    # reproduces the held-out estimate, not the search's in-sample maximum.
    held_out = best.get("heldout_n") is not None
    indices = held_out_indices(job.concept, tune_run.spec.num_images) if held_out else None
    data = run_data(tune_run.spec, job.model_ref, job.concept.name, tune_run.space.raw_params(config), tune_run.output,
                    prompt_indices=indices)
    if threads is not None:
        # CPU kernels sum in a thread-count-dependent order: the trials' thread count makes the
        # run's scores equal the trial's to the last bit.
        data["torch_threads"] = threads
    # The judges the trials were scored with, spelled out, so the run scores the same way.
    data["judges"] = [r.label() if not r.options else r.model_dump(mode="json", exclude_none=True)
                      for r in judge_requests(job.grid.spec.judges)]
    run_spec_from_dict(data, "best config")  # `engine run` must accept it as is
    name = f"best_{slug(job.model.name)}_{slug(job.concept.name)}.yaml"
    interval = f"[{_fmt(best['ci_low'])}, {_fmt(best['ci_high'])}]"
    header = (
        f"# engine tune: best of {tune_run.spec.algorithm} search for {job.model.name} x {job.concept.name}, "
        f"probe {tune_run.spec.probe}; run it with `engine run {name}`\n"
    )
    if held_out:
        header += (f"# held-out estimate (other prompts and seeds, prompt_indices below; what `engine run` of this "
                   f"file measures): {_held_out(best)}\n")
    header += (f"# in-sample search maximum (biased upward by the search): {tune_run.spec.objective} = "
               f"{_fmt(best['objective'])} {interval} on n = {best['n']} images (trial {best['trial_index']})\n")
    tune_run.output.atomic_write((header + yaml.safe_dump(data, sort_keys=False)).encode(), name)
    return tune_run.output.display(name)


def _held_out(best: dict[str, Any]) -> str:
    interval = f"[{_fmt(best['heldout_ci_low'])}, {_fmt(best['heldout_ci_high'])}]"
    return f"{best['objective_name']} {_fmt(best['heldout_objective'])} {interval} on n = {best['heldout_n']} images"


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4g}"


TRIAL_FIELDS = [
    ("model", pa.string()), ("method", pa.string()), ("concept", pa.string()), ("probe", pa.string()),
    ("algorithm", pa.string()), ("objective_name", pa.string()), ("trial_index", pa.int32()),
    ("trial_id", pa.string()), ("status", pa.string()), ("params", pa.string()), ("searched", pa.string()),
    ("objective", pa.float64()), ("ci_low", pa.float64()), ("ci_high", pa.float64()), ("n", pa.int32()),
    ("hits", pa.int32()), *[(m.value, pa.float64()) for m in METRICS], ("images_scored", pa.int32()),
    ("trial_seconds", pa.float64()),
    ("setup_seconds", pa.float64()), ("generation_seconds", pa.float64()), ("scoring_seconds", pa.float64()),
    ("pipeline_loaded", pa.bool_()), ("process_trial_index", pa.int32()), ("worker_pid", pa.int64()),
    ("error", pa.string()),
    # recovery: the concept is one the model erased; unpaired: the model declares nothing.
    ("role", pa.string()),
    # The best trial's setting re-run on held-out prompts/seeds (same size, disjoint): the search's
    # best objective is the maximum of noisy estimates, biased upward; this one is not.
    ("is_best", pa.bool_()), ("heldout_objective", pa.float64()), ("heldout_ci_low", pa.float64()),
    ("heldout_ci_high", pa.float64()), ("heldout_n", pa.int32()), ("heldout_hits", pa.int32()),
    ("heldout_seconds", pa.float64()), ("heldout_seeds", pa.string()),
]


def write_trials(output: OutputLocation, records: list[dict[str, Any]]) -> None:
    """One row per trial; searched values also as param_<key> columns. Written atomically."""
    columns = {name: pa.array([_cast(r.get(name), kind) for r in records], type=kind) for name, kind in TRIAL_FIELDS}
    for name in sorted({k for r in records for k in r if k.startswith("param_")}):
        values = [r.get(name) for r in records]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values if v is not None)
        columns[name] = pa.array([float(v) if v is not None else None for v in values] if numeric
                                 else [None if v is None else json.dumps(v) for v in values])
    output.atomic_write(table_bytes(pa.table(columns)), TRIALS_FILE)


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
        if best is None:  # no trial of the pair completed: there is no best setting to print
            lines.append(f"{pair.model} x {pair.concept}: no trial completed of {pair.trials}; no best setting")
            continue
        interval = f"[{_fmt(best['ci_low'])}, {_fmt(best['ci_high'])}]"
        if best.get("heldout_n") is not None:
            lines.append(f"{pair.model} x {pair.concept}: best setting {best['searched']}: held-out {_held_out(best)} "
                         f"-> {pair.best_config}")
            lines.append(f"  in-sample search maximum (biased upward): {best['objective_name']} "
                         f"{_fmt(best['objective'])} {interval} (n={best['n']})")
        else:
            lines.append(
                f"{pair.model} x {pair.concept}: best {best['objective_name']} in-sample {_fmt(best['objective'])} "
                f"{interval} (n={best['n']}) at {best['searched']} -> {pair.best_config}"
            )
        lines.append(
            f"  {pair.trials} trials on {pair.worker_processes} worker process(es), {pair.pipeline_loads} pipeline "
            f"load(s); first trial per process {_fmt(pair.first_trial_seconds)} s, later trials "
            f"{_fmt(pair.later_trial_seconds)} s"
        )
    lines.append(f"trials: {summary.trials_path} ({summary.seconds:.1f} s)")
    return lines
