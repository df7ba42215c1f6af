"""The search of one (model, concept) pair with Ray Tune: search algorithm, domains, trial records.

Runs inside a Ray task, so the pairs of one `engine tune` search side by side on a cluster.
"""

from __future__ import annotations

import json
import math
import os
import uuid
import warnings
from dataclasses import dataclass
from typing import Any

from engine.metrics.columns import METRICS
from engine.tracking.wandb_run import WandbTarget
from engine.tune.pairs import METRIC, slug
from engine.tune.space import SearchDimension, SearchSpace
from engine.tune.trial import TrialSetup, tune_trial


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
    # `--track mlflow`: the driver's tracking URI made absolute (trials run in other folders), and the experiment.
    mlflow: tuple[str, str] | None = None
    wandb: WandbTarget | None = None  # `--track wandb`: project, mode and absolute folder, from the driver


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


def ray_domain(dim: SearchDimension) -> Any:
    from ray import tune

    if dim.distribution == "choice":
        return tune.choice(dim.choices())
    low, high = dim.span()
    if dim.distribution == "int":
        return tune.randint(int(low), int(high) + 1)  # Tune's upper bound is exclusive
    if dim.distribution == "logint":
        return tune.lograndint(int(low), int(high) + 1)
    if dim.distribution == "loguniform":
        return tune.loguniform(low, high)
    return tune.uniform(low, high)


def search_pair(setup: TrialSetup, settings: SearchSettings, trainable=None, board=None,
                search: str = "") -> list[dict[str, Any]]:
    """Run one (model, concept) search with Ray Tune; one record per trial. `trainable` replaces
    tune_trial (the synthetic-surface benchmark); `board` (a TrialBoard actor) hears of each
    finished trial under the name `search`."""
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
        run_config=tune.RunConfig(storage_path=settings.storage_path, name=settings.experiment, verbose=0,
                                  callbacks=_callbacks(settings, board, search) or None),
    )
    results = tuner.fit()
    return [_trial_record(index, result, setup, settings) for index, result in enumerate(results)]


def _callbacks(settings: SearchSettings, board, search: str) -> list:
    callbacks = [progress_callback(board, search, settings.max_t)] if board else []
    if settings.mlflow is not None:  # one MLflow run per trial: its params, every result it reports
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        uri, experiment = settings.mlflow
        callbacks.append(MLflowLoggerCallback(tracking_uri=uri, experiment_name=experiment,
                                              tags={"search": settings.experiment, "pair": search}))
    if settings.wandb is not None:  # one W&B run per trial, grouped by the search
        from ray.air.integrations.wandb import WandbLoggerCallback

        target = settings.wandb
        # Ray's callback asks for an API key unless WANDB_MODE says offline or disabled; this
        # process is a Ray task of `engine tune`, so the driver's setting is passed on here.
        os.environ["WANDB_MODE"] = target.mode
        callbacks.append(WandbLoggerCallback(project=target.project, group=settings.experiment, mode=target.mode,
                                             dir=target.folder, tags=[f"pair:{search}"[:64]], job_type="tune-trial"))
    return callbacks


def progress_callback(board, search: str, max_t: int):
    """A Tune callback telling `board` of every finished trial, with its objective when it scored
    every image (an early-stopped trial's metric is over fewer images: not comparable)."""
    from ray.tune import Callback

    class TrialProgress(Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            result = trial.last_result or {}
            complete = result.get("images_scored", 0) >= max_t
            board.trial_finished.remote(search, result.get(METRIC) if complete else None)

        def on_trial_error(self, iteration, trials, trial, **info):
            board.trial_finished.remote(search, None)

    return TrialProgress()


def _bound_trial(function, setup: TrialSetup, experiment: str):
    """`function` with `setup` bound, under a name unique to this search. Tune registers trainables
    (and tune.with_parameters' objects) cluster-wide by name and by str(function); two searches
    running together in one job would otherwise overwrite each other's setup, and a trial of one
    pair would evaluate the other pair's model."""

    def trial(config: dict[str, Any]) -> None:
        return function(config, setup)

    trial.__name__ = trial.__qualname__ = f"tune_trial_{slug(experiment)}_{uuid.uuid4().hex[:8]}"
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
    for key in ["objective", "ci_low", "ci_high", "n", "hits", *(m.value for m in METRICS), "images_scored",
                "trial_seconds", "setup_seconds", "generation_seconds", "scoring_seconds",
                "pipeline_loaded", "process_trial_index", "worker_pid"]:
        value = metrics.get(key)
        record[key] = None if value is None or (isinstance(value, float) and math.isnan(value)) else value
    for dim in setup.space.dimensions:
        record[f"param_{dim.key}"] = config[dim.key]
    return record
