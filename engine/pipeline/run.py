"""Build and execute the Ray Data pipeline of a run, on a local Ray or an existing cluster.

units (driver) -> ray.data.from_items -> map_batches(ProbeActor, ActorPoolStrategy)
               -> map_batches(ScoreActor, fractional GPU) -> RowsDatasink(<output>/rows/)
The run holds the output's lock throughout (engine.lock); finished rows are skipped (resume); the
manifest records config, versions, times, counts and where files were written (engine.storage).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass

from engine.errors import UserError
from engine.lock import OutputLock
from engine.pipeline.grid import RunPlan, pending_rows, work_units
from engine.pipeline.shipping import code_runtime_env, report_node_engines, should_ship, uses_toy_weights
from engine.pipeline.sink import RowsDatasink
from engine.pipeline.stages import ProbeActor, ScoreActor, actor_payload, score_payload
from engine.results import (
    base_manifest,
    finished_row_ids,
    now_iso,
    read_manifest,
    remove_temporaries,
    remove_unreadable_files,
    write_manifest,
)
from engine.scoring.preflight import check_run_scoring
from engine.scoring.registry import judge_requests
from engine.storage import OutputLocation, Placement, output_location, placement

logger = logging.getLogger(__name__)

# Passed to every Ray worker: offline hub, no usage stats, no auth tokens (environment.md).
WORKER_ENV_DEFAULTS = {"RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"}
WORKER_ENV_PASSTHROUGH = ["HF_HUB_OFFLINE", "HF_HOME", "HF_HUB_CACHE", "ENGINE_CONFIG_DIR", "RAY_AUTH_MODE"]
# Object-store endpoints and credentials: write tasks on every node open the output themselves.
STORAGE_ENV_PASSTHROUGH = [
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION",
    "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_CA_BUNDLE",
    "GOOGLE_APPLICATION_CREDENTIALS", "AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_SAS_TOKEN",
]  # fmt: skip


@dataclass
class RunSummary:
    output: OutputLocation
    planned: int
    skipped: int
    generated: int
    total_rows: int
    seconds: float


def worker_env() -> dict[str, str]:
    env = dict(WORKER_ENV_DEFAULTS)
    env.update({k: os.environ[k] for k in WORKER_ENV_PASSTHROUGH + STORAGE_ENV_PASSTHROUGH if k in os.environ})
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
    output = output_location(plan.spec.output)
    # One writer per output: a second run into the same folder stops here (UserError naming the holder).
    with OutputLock(output, "engine run") as lock:
        return _execute_locked(plan, cluster, ship_code, output, lock)


def _execute_locked(
    plan: RunPlan, cluster: str | None, ship_code: bool | None, output: OutputLocation, lock: OutputLock
) -> RunSummary:
    started = time.perf_counter()
    # Under the lock, partial files can only be a dead writer's: removing them deletes nothing live.
    for name in remove_temporaries(output) + remove_unreadable_files(output):
        logger.warning("removed a partial file left by an interrupted run: %s", name)
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
            where = output_placement(ray, output, cluster, plan.spec.shared_output)
            # Said out loud on a cluster: where the rows and the caches end up is the user's to know.
            (logger.warning if where.driver_writes or where.node_caches else logger.info)(
                "output %s: %s", output, where.reason)
            manifest["storage"] = {**where.describe(), "driver_node": ray.get_runtime_context().get_node_id()}
            _stream(ray, plan, todo, output, RowsDatasink(output, lock.token, where.driver_writes), where.cache_dir)

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


def output_placement(ray, output: OutputLocation, cluster: str | None, shared: bool) -> Placement:
    """Where this run writes and caches. A cluster we connected to counts as several machines even
    if it has one node now: an autoscaler may add some, and a local path is not shared with them."""
    alive = [node for node in ray.nodes() if node.get("Alive")]
    return placement(output, multi_node=cluster is not None or len(alive) > 1, shared=shared)


def _stream(ray, plan: RunPlan, todo, output: OutputLocation, sink: RowsDatasink, cache_dir: str) -> None:
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
    payload = actor_payload(plan, device, spec.attention, spec.torch_threads, cache_dir)
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
    # Writes pinned to the driver's node reserve no CPU: a head node started with --num-cpus 0 (common)
    # must still take them, and a write is light next to generation.
    dataset.write_datasink(sink, ray_remote_args={"num_cpus": 0} if sink.driver_only else None)
