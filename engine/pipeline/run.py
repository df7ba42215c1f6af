"""Build and execute the Ray Data pipeline of a run, on a local Ray or an existing cluster.

units (driver) -> ray.data.from_items -> map_batches(ProbeActor, ActorPoolStrategy)
               -> map_batches(ScoreActor, fractional GPU) -> RowsDatasink(<output>/rows/)
The run holds the output's lock throughout (engine.lock); finished rows are skipped (resume). Rows
that fail on their own go to <output>/failures.parquet (reported through the run's log actor, never
through the stream) and are retried by the same command. The manifest records config, versions,
provenance, times, counts, faults and where files were written (engine.storage). A fault that stops
the stream (disk, output, store, model, node, bug) is settled by engine.pipeline.fault_exit. A local Ray
starts in the background (engine.pipeline.ray_start) while the driver imports the stages.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.failures import merge_failures, read_failures, write_failures
from engine.lock import OutputLock
from engine.models.prefetch import delete_run_downloads, missing_hub_models
from engine.pipeline.batching import batching_record, unit_rows
from engine.pipeline.fault_exit import stopping_cleanly
from engine.pipeline.grid import RunGrid, pending_rows, work_units
from engine.pipeline.memory_plan import check_run_fits
from engine.pipeline.progress import Progress, progress_seconds, watched
from engine.pipeline.provenance import command_line, model_source
from engine.pipeline.ray_start import (  # noqa: F401  (ray_session, worker_env: imported from here elsewhere)
    STORAGE_ENV_PASSTHROUGH,
    WORKER_ENV_DEFAULTS,
    WORKER_ENV_PASSTHROUGH,
    ray_session,
    ray_starting,
    worker_env,
)
from engine.pipeline.raynoise import filter_ray_loggers, filtered_stderr
from engine.pipeline.resources import plan_resources
from engine.pipeline.runlog import RunEvents, RunLog
from engine.pipeline.shipping import uses_toy_weights
from engine.pipeline.sink import RowsDatasink, ready_writer
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
from engine.storage import OutputLocation, Placement, output_location, placement

logger = logging.getLogger(__name__)

WRITE_RETRIES = 3  # a write task's worker may die this many times (then: engine.pipeline.faults WORKER_LOST)

@dataclass
class RunSummary:
    output: OutputLocation
    planned: int
    skipped: int
    generated: int
    failed: int  # planned rows listed in failures.parquet: the same command retries them
    total_rows: int
    seconds: float


@dataclass
class StreamResult:
    """What the stream's actors reported (engine.pipeline.runlog), and the pools they formed."""

    events: RunEvents = field(default_factory=RunEvents)
    pool_sizes: dict[str, int] = field(default_factory=dict)
    batching: tuple[int | str, bool] | None = None  # (batch_size asked, units cut for a GPU)


def execute(
    grid: RunGrid,
    cluster: str | None = None,
    ship_code: bool | None = None,
    on_locked: Callable[[], None] | None = None,
) -> RunSummary:
    """Run the grid. `on_locked` is called once the output's lock is held, before any work (the CLI
    prints the rows per model x probe there, so a refused second writer prints only its error)."""
    check_run_scoring(grid.spec, grid.concepts, [p.params for p in grid.probes])
    progress_seconds()  # a bad ENGINE_PROGRESS_SECONDS is a user error: say so before any work
    check_run_fits(grid)  # model_memory too small for a model, or no disk for the downloads
    output = output_location(grid.spec.output)
    # One writer per output: a second run into the same folder stops here (UserError naming the holder).
    with OutputLock(output, "engine run") as lock:
        if on_locked is not None:
            on_locked()
        # A fault mid-run (disk full, output or store gone, model gone, node lost, a bug) becomes
        # one RunFault with its class and exit code; the output is left for the same command.
        with stopping_cleanly(grid, output, lock):
            return _execute_locked(grid, cluster, ship_code, output, lock)


def _execute_locked(
    grid: RunGrid, cluster: str | None, ship_code: bool | None, output: OutputLocation, lock: OutputLock
) -> RunSummary:
    started = time.perf_counter()
    # Under the lock, partial files can only be a dead writer's: removing them deletes nothing live.
    for name in remove_temporaries(output) + remove_unreadable_files(output):
        logger.warning("removed a partial file left by an interrupted run: %s", name)
    finished = finished_row_ids(output)
    todo = pending_rows(grid.rows, finished)
    manifest = {
        **base_manifest(grid.resolved_config()),
        "command_line": command_line(),
        "started_at": now_iso(),
        "status": "running",
        "history": read_manifest(output).get("history", []),
        "counts": {"planned": len(grid.rows), "already_done": len(grid.rows) - len(todo)},
    }
    write_manifest(output, manifest)

    stream = StreamResult()
    # keep_downloads false: what this node lacks now and has after the run was downloaded by it.
    missing_hub = [] if grid.spec.keep_downloads else missing_hub_models(grid.models)
    if todo:
        with ray_starting(cluster, ship_code, uses_toy_weights(grid)) as session:
            import engine.pipeline.stages  # noqa: F401  (torch, diffusers, judges: imported while Ray starts)

            ray = session.ready()
            where = output_placement(ray, output, cluster, grid.spec.shared_output)
            # Said out loud on a cluster: where the rows and the caches end up is the user's to know.
            (logger.warning if where.driver_writes or where.node_caches else logger.info)(
                "output %s: %s", output, where.reason)
            manifest["storage"] = {**where.describe(), "driver_node": ray.get_runtime_context().get_node_id()}
            sink = RowsDatasink(output, lock.token, where.driver_writes)
            stream = _stream(ray, grid, todo, output, sink, where.cache_dir)

    delete_run_downloads(missing_hub)
    done = finished_row_ids(output)
    attempted = {r.row_id for r in todo}
    failures = merge_failures(read_failures(output), stream.events.failed_rows(), attempted, done)
    write_failures(output, failures)
    failed_ids = {f.row.row_id for f in failures}
    missing = [r.row_id for r in grid.rows if r.row_id not in done and r.row_id not in failed_ids]
    if missing:
        raise RuntimeError(f"{len(missing)} of {len(grid.rows)} planned rows are missing from {output}")
    failed = sum(1 for r in grid.rows if r.row_id in failed_ids)
    generated = len(attempted & done)
    seconds = time.perf_counter() - started
    manifest.update(
        status="complete" if not failed else "incomplete",
        finished_at=now_iso(),
        counts={**manifest["counts"], "generated": generated, "failed": failed, "rows_in_dataset": len(done)},
        faults=stream.events.fault_counts(stream.pool_sizes),
        provenance=_provenance(grid, stream.events),
    )
    if stream.events.model_caches:
        manifest["model_cache"] = stream.events.model_cache_record()
    if stream.batching is not None:
        manifest["batching"] = batching_record(*stream.batching, stream.events.batch_sizes)
    manifest["history"].append({"finished_at": manifest["finished_at"], "generated": generated, "failed": failed})
    write_manifest(output, manifest)
    return RunSummary(output, len(grid.rows), len(grid.rows) - len(todo), generated, failed, len(done), seconds)


def _provenance(grid: RunGrid, events: RunEvents) -> dict:
    """Resolved after the stream: by then the actors have put hub models into this machine's cache."""
    return {
        "models": {m.name: model_source(m) for m in grid.models},
        "base_model": model_source(grid.base) if grid.base else None,
        "gpus": events.gpus(),
        "actors": [vars(a) for a in events.actors],
    }


def output_placement(ray, output: OutputLocation, cluster: str | None, shared: bool) -> Placement:
    """Where this run writes and caches. A cluster we connected to counts as several machines even
    if it has one node now: an autoscaler may add some, and a local path is not shared with them."""
    alive = [node for node in ray.nodes() if node.get("Alive")]
    return placement(output, multi_node=cluster is not None or len(alive) > 1, shared=shared)


def _stream(
    ray, grid: RunGrid, todo, output: OutputLocation, sink: RowsDatasink, cache_dir: str
) -> StreamResult:
    from ray.data import ActorPoolStrategy, DataContext
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from engine.pipeline.affinity import UnitScheduler
    from engine.pipeline.stages import (
        TICKET_COLUMN,
        UNIT_COLUMN,
        ProbeActor,
        ProbeStageConfig,
        ScoreActor,
        ScoreStageConfig,
        encode_units,
    )

    spec = grid.spec
    live = sys.stderr.isatty()  # before filtered_stderr turns stderr into a pipe
    DataContext.get_current().enable_progress_bars = False  # the engine shows its own (below)
    filter_ray_loggers()
    if not logger.isEnabledFor(logging.INFO):
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    cluster_gpus = float(ray.cluster_resources().get("GPU", 0))
    # The device does not depend on the unit count (it only caps the actors); batch_size auto does.
    on_gpu = plan_resources(cluster_gpus, spec, len(todo)).probe_device == "cuda"
    units = work_units(todo, unit_rows(spec.batch_size, on_gpu))
    resources = plan_resources(cluster_gpus, spec, len(units))
    logger.info("%d rows in %d units on %d actor(s), %s GPU each", len(todo), len(units), resources.probe_actors,
                resources.gpus_per_probe_actor)
    # The run's log lives on this node: it dies with the driver, never with a worker node.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    # Not waited for: the write tasks' worker gets ready while the actors start.
    ray.remote(num_cpus=0, max_retries=0)(ready_writer).options(scheduling_strategy=here).remote()
    log = ray.remote(num_cpus=0, max_restarts=0)(RunLog).options(scheduling_strategy=here).remote()
    probe_config = ProbeStageConfig.from_grid(grid, resources.probe_device, spec.attention, spec.torch_threads,
                                              cache_dir)
    # Model affinity (engine.pipeline.affinity): the stream carries tickets; the scheduler, beside
    # the log, hands each actor the units of its own slice of models. Each actor's first model
    # loads while Ray Data hands it its first ticket.
    scheduler = ray.remote(num_cpus=0, max_restarts=0)(UnitScheduler).options(scheduling_strategy=here).remote(
        [item[UNIT_COLUMN] for item in encode_units(units)], [u[0].model for u in units], [len(u) for u in units],
        resources.probe_actors)
    dataset = ray.data.from_items([{TICKET_COLUMN: i} for i in range(len(units))], override_num_blocks=len(units))
    dataset = dataset.map_batches(
        ProbeActor,
        fn_constructor_kwargs={"config": probe_config, "log": log, "scheduler": scheduler,
                               "keep_downloads": spec.keep_downloads},
        # One ticket at a time: a ticket queued behind a long unit would keep a free actor waiting.
        compute=ActorPoolStrategy(size=resources.probe_actors, max_tasks_in_flight_per_actor=1),
        num_gpus=resources.gpus_per_probe_actor,
        num_cpus=1,
        batch_size=1,  # one unit: the driver already fixed which rows run together
        batch_format="numpy",
    )
    if resources.score_actors:
        dataset = dataset.map_batches(
            ScoreActor,
            fn_constructor_kwargs={
                "config": ScoreStageConfig.from_grid(grid, resources.score_device, spec.torch_threads),
                "log": log,
            },
            compute=ActorPoolStrategy(size=resources.score_actors),
            num_gpus=resources.gpus_per_score_actor,
            # No CPU reservation: judging costs a few ms per image, and a reserved core could leave
            # a probe actor unschedulable on small machines (2 cores: probe + write + scorer).
            num_cpus=0,
            batch_size=spec.score_batch_size,
            batch_format="pyarrow",
        )

    def fetch() -> tuple[int, str]:
        done, failed = ray.get(log.progress.remote(), timeout=30)
        return done, f"{failed} failed" if failed else ""

    try:
        with filtered_stderr() as terminal:
            # Lines (not a terminal) go to sys.stderr, where a caller may capture them.
            progress = Progress(len(todo), "rows", "progress", "images/s", live, stream=terminal if live else None)
            with watched(progress, fetch):
                # Writes pinned to the driver's node reserve no CPU: a head node started with
                # --num-cpus 0 (common) must still take them, and a write is light next to generation.
                # Finite retries: Ray Data retries a task whose worker died forever by default, and a
                # write that keeps killing its worker (the OOM killer, a bad node) would hang the run.
                write_args = {"max_retries": WRITE_RETRIES, **({"num_cpus": 0} if sink.driver_only else {})}
                dataset.write_datasink(sink, ray_remote_args=write_args)
        events = ray.get(log.snapshot.remote())
        events.affinity = ray.get(scheduler.record.remote())
        return StreamResult(events, resources.pool_sizes(), (spec.batch_size, on_gpu))
    finally:
        ray.kill(log)
        ray.kill(scheduler)
