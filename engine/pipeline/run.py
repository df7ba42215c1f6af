"""Build and execute the Ray Data pipeline of a run, on a local Ray or an existing cluster.

units (driver) -> ray.data.from_items -> map_batches(ProbeActor, ActorPoolStrategy)
               -> map_batches(ScoreActor, fractional GPU) -> write_parquet(<output>/rows/)
Finished rows are skipped (resume); the manifest records config, versions, times and counts.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from engine.errors import UserError
from engine.pipeline.grid import RunPlan, pending_rows, work_units
from engine.pipeline.shipping import code_runtime_env, report_node_engines, should_ship, uses_toy_weights
from engine.pipeline.stages import ProbeActor, ScoreActor, actor_payload, score_payload
from engine.results import (
    base_manifest,
    finished_row_ids,
    now_iso,
    read_manifest,
    remove_unreadable_files,
    rows_dir,
    write_manifest,
)
from engine.scoring.preflight import check_run_scoring
from engine.scoring.registry import judge_requests

logger = logging.getLogger(__name__)

# Passed to every Ray worker: offline hub, no usage stats, no auth tokens (environment.md).
WORKER_ENV_DEFAULTS = {"RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"}
WORKER_ENV_PASSTHROUGH = ["HF_HUB_OFFLINE", "HF_HOME", "HF_HUB_CACHE", "ENGINE_CONFIG_DIR", "RAY_AUTH_MODE"]


@dataclass
class RunSummary:
    output: Path
    planned: int
    skipped: int
    generated: int
    total_rows: int
    seconds: float


def worker_env() -> dict[str, str]:
    env = dict(WORKER_ENV_DEFAULTS)
    env.update({k: os.environ[k] for k in WORKER_ENV_PASSTHROUGH if k in os.environ})
    return env


@contextmanager
def ray_session(cluster: str | None, ship_code: bool | None = None, toy_weights: bool = False):
    """Connect to `cluster` ('auto' reads RAY_ADDRESS), reuse a running session (tests), or start a
    local Ray that is shut down at the end. Shipping the engine's code to the workers (shipping.py)
    defaults to on for an existing cluster; `toy_weights` says whether the toy-world weights go too."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ship = should_ship(cluster, ship_code)
    runtime_env = {"env_vars": worker_env(), **(code_runtime_env(toy_weights) if ship else {})}
    # Ray's own INFO lines drown the CLI's output; --verbose turns the engine's logging back on.
    quiet = {"log_to_driver": False, "logging_level": logging.WARNING}
    if cluster:
        ray.init(address=cluster, runtime_env=runtime_env, **quiet)
    else:
        # address="local": always a fresh local Ray, never a cluster that `ray start` left running
        # on this machine (ray.init() alone would join it).
        ray.init(address="local", include_dashboard=False, runtime_env=runtime_env, **quiet)
    try:
        if cluster or ship:
            report_node_engines(ray, shipped=ship)
        yield ray
    finally:
        ray.shutdown()


def execute(plan: RunPlan, cluster: str | None = None, ship_code: bool | None = None) -> RunSummary:
    check_run_scoring(plan.spec, plan.concepts, [p.params for p in plan.probes])
    output = Path(plan.spec.output).resolve()
    output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    for path in remove_unreadable_files(output):
        logger.warning("removed a half-written results file from an interrupted run: %s", path.name)
    finished = finished_row_ids(output)
    todo = pending_rows(plan.rows, finished)
    manifest = {
        **base_manifest(plan.resolved_config()),
        "started_at": now_iso(),
        "status": "running",
        "history": read_manifest(output).get("history", []),
        "counts": {"planned": len(plan.rows), "already_done": len(plan.rows) - len(todo)},
    }
    write_manifest(output, manifest)

    if todo:
        with ray_session(cluster, ship_code, uses_toy_weights(plan)) as ray:
            _stream(ray, plan, todo, output)

    done = finished_row_ids(output)
    missing = [r.row_id for r in plan.rows if r.row_id not in done]
    if missing:
        raise RuntimeError(f"{len(missing)} of {len(plan.rows)} planned rows are missing from {output}")
    seconds = time.perf_counter() - started
    manifest.update(
        status="complete",
        finished_at=now_iso(),
        counts={**manifest["counts"], "generated": len(todo), "rows_in_dataset": len(done)},
    )
    manifest["history"].append({"finished_at": manifest["finished_at"], "generated": len(todo)})
    write_manifest(output, manifest)
    return RunSummary(output, len(plan.rows), len(plan.rows) - len(todo), len(todo), len(done), seconds)


def _stream(ray, plan: RunPlan, todo, output: Path) -> None:
    from ray.data import ActorPoolStrategy, DataContext

    spec = plan.spec
    DataContext.get_current().enable_progress_bars = sys.stderr.isatty()
    if not logger.isEnabledFor(logging.INFO):
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    cluster_gpus = int(ray.cluster_resources().get("GPU", 0))
    judges = judge_requests(spec.judges)
    # Scoring shares the GPUs: by default a probe actor takes 0.9 of one and a score actor 0.1.
    score_gpus = ((0.1 if cluster_gpus else 0.0) if spec.score_gpus == "auto" else spec.score_gpus) if judges else 0.0
    gpus_per_actor = spec.gpus_per_actor
    if gpus_per_actor == "auto":
        gpus_per_actor = 1.0 - score_gpus if cluster_gpus else 0.0
    actors = (max(1, cluster_gpus) if spec.actors == "auto" else spec.actors)
    device = spec.device if spec.device != "auto" else ("cuda" if gpus_per_actor > 0 else "cpu")
    units = work_units(todo, spec.batch_size)
    actors = min(actors, len(units))
    wanted_gpus = actors * gpus_per_actor + (spec.score_actors * score_gpus if judges else 0.0)
    if cluster_gpus and wanted_gpus > cluster_gpus + 1e-6:
        raise UserError(
            f"{actors} probe actor(s) x {gpus_per_actor} GPU + {spec.score_actors} score actor(s) x {score_gpus} GPU "
            f"need {wanted_gpus:g} GPUs; the cluster has {cluster_gpus}. Lower gpus_per_actor, actors or score_gpus"
        )
    logger.info("%d rows in %d units on %d actor(s), %s GPU each", len(todo), len(units), actors, gpus_per_actor)
    payload = actor_payload(plan, device, spec.attention, spec.torch_threads, str(output / "cache"))
    dataset = ray.data.from_items(units, override_num_blocks=len(units))
    dataset = dataset.map_batches(
        ProbeActor,
        fn_constructor_kwargs={"payload": payload},
        compute=ActorPoolStrategy(size=actors),
        num_gpus=gpus_per_actor,
        num_cpus=1,
        batch_size=1,  # one unit: the driver already fixed which rows run together
        batch_format="numpy",
    )
    if judges:
        score_device = "cuda" if score_gpus > 0 else "cpu"
        dataset = dataset.map_batches(
            ScoreActor,
            fn_constructor_kwargs={"payload": score_payload(plan, score_device, spec.torch_threads)},
            compute=ActorPoolStrategy(size=spec.score_actors),
            num_gpus=score_gpus,
            # No CPU reservation: judging costs a few ms per image, and a reserved core could leave
            # a probe actor unschedulable on small machines (2 cores: probe + write + scorer).
            num_cpus=0,
            batch_size=spec.score_batch_size,
            batch_format="pyarrow",
        )
    dataset.write_parquet(str(rows_dir(output)))
