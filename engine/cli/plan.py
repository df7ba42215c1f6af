"""`engine plan CONFIG`: what a run would do and cost, without loading a model (the network only for
the sizes of hub models not downloaded, never with HF_HUB_OFFLINE=1)."""

from __future__ import annotations

from pathlib import Path

import typer

from engine.cli.app import app, setup_logging, user_errors


@app.command()
@user_errors
def plan(
    config: Path = typer.Argument(..., help="Run file (YAML grid), as `engine run` takes it."),
    gpu: str = typer.Option("h100", "--gpu", help="GPU of the estimate: h100, a100 or a6000."),
    set_: list[str] = typer.Option([], "--set", help="key.sub=value override of the run config."),
    actors: int | None = typer.Option(None, "--actors", help="Probe actors to plan models for (default: the "
                                      "run's `actors`, or 8 for auto: one 8-GPU node)."),
    assume_recovery: float | None = typer.Option(
        None, "--assume-recovery", help="Per-candidate hit probability p: the expected images of best-of-N sweeps "
        "with stop: on_hit, candidates independent (the formula is printed)."),
    from_run: str | None = typer.Option(
        None, "--from-run", help="An earlier run's folder: the expected images of stop: on_hit from its rows' "
        "candidate_hits (per cell, the round of each prompt's first hit)."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Rows per model x probe, images (best-of-N candidates included), UNet evaluations, model loads,
    hub ids (and whether each is cached) and estimated GPU-hours, for this engine and the original's
    one-image-per-call way; per node, the model memory per actor under the budget, model loads, bytes
    to download and whether the hub cache's disk holds them. Loads nothing; missing weights or
    classifiers are listed, not errors; only the sizes of missing hub models are asked online. Best-of-N
    sweeps with stop: on_hit (or any, with --assume-recovery / --from-run): exhaustive, best, expected."""
    from engine.errors import UserError
    from engine.pipeline.grid import expand_run
    from engine.pipeline.memory_plan import memory_lines, plan_memory
    from engine.pipeline.plan import ENGINE_TFLOPS, GPUS, estimate, plan_lines
    from engine.pipeline.space import check_room, room_lines
    from engine.pipeline.stop_plan import plan_stop, stop_lines
    from engine.specs.runs import load_run_file

    setup_logging(verbose)
    if gpu.lower() not in GPUS:
        raise UserError(f"unknown --gpu {gpu!r}; valid choices: {', '.join(GPUS)}")
    if assume_recovery is not None and from_run is not None:
        raise UserError("give --assume-recovery or --from-run, not both")
    if assume_recovery is not None and not 0.0 <= assume_recovery <= 1.0:
        raise UserError(f"--assume-recovery {assume_recovery}: a per-candidate hit probability in [0, 1]")
    if from_run is not None and not from_run.strip():
        raise UserError("--from-run: give an earlier run's output folder")
    grid = expand_run(load_run_file(config, set_), strict=False)
    cost = estimate(grid)
    for line in plan_lines(cost, gpu.lower()):
        typer.echo(line)
    for line in stop_lines(plan_stop(grid, assume_recovery, from_run), ENGINE_TFLOPS[gpu.lower()], gpu.lower()):
        typer.echo(line)
    for line in memory_lines(plan_memory(grid, actors, gpu.lower())):
        typer.echo(line)
    typer.echo("")
    for line in room_lines(check_room(grid, grid.rows), len(grid.rows)):
        typer.echo(line)
