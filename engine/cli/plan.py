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
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Rows per model x probe, images (best-of-N candidates included), UNet evaluations, model loads,
    hub ids (and whether each is cached) and estimated GPU-hours, for this engine and the original's
    one-image-per-call way; per node, the model memory per actor under the budget, model loads, bytes
    to download and whether the hub cache's disk holds them. Loads nothing; missing weights or
    classifiers are listed, not errors; only the sizes of missing hub models are asked online."""
    from engine.errors import UserError
    from engine.pipeline.grid import expand_run
    from engine.pipeline.memory_plan import memory_lines, plan_memory
    from engine.pipeline.plan import GPUS, estimate, plan_lines
    from engine.pipeline.space import check_room, room_lines
    from engine.specs.runs import load_run_file

    setup_logging(verbose)
    if gpu.lower() not in GPUS:
        raise UserError(f"unknown --gpu {gpu!r}; valid choices: {', '.join(GPUS)}")
    grid = expand_run(load_run_file(config, set_), strict=False)
    cost = estimate(grid)
    for line in plan_lines(cost, gpu.lower()):
        typer.echo(line)
    for line in memory_lines(plan_memory(grid, actors, gpu.lower())):
        typer.echo(line)
    typer.echo("")
    for line in room_lines(check_room(grid, grid.rows), len(grid.rows)):
        typer.echo(line)
