"""`engine run` and `engine demo`: build a run spec from a file or flags, expand it, execute it."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from engine.cli.app import app, one_line, setup_logging, user_errors
from engine.cli.validation import check_output_folder, check_run_names
from engine.tracking.trackers import check_trackers


@app.command()
@user_errors
def run(
    config: Path | None = typer.Argument(None, help="Run file (YAML grid). Flags below build one instead."),
    model: list[str] = typer.Option([], "--model", help="Model: built-in, configs/models stem, folder or hub id."),
    concept: list[str] = typer.Option([], "--concept", help="Concept slug (repeatable)."),
    probe: list[str] = typer.Option([], "--probe", help="Probe name (repeatable)."),
    num_images: int | None = typer.Option(None, "--num-images", help="Prompts per cell."),
    output: str | None = typer.Option(
        None, "--output", help="Output folder: a local path or a URI (s3://bucket/run, gs://, abfs://, local://)."
    ),
    shared_output: bool = typer.Option(
        False, "--shared-output", help="The local --output is on storage every cluster node sees (NFS...)."
    ),
    base_model: str | None = typer.Option(None, "--base-model", help="The original, un-erased model."),
    unet: Path | None = typer.Option(None, "--unet", help="Erased UNet on the base model's other parts."),
    method: str | None = typer.Option(
        None, "--method", help="Erasure method label of the --model/--unet models (default: theirs, else unknown)."
    ),
    erased: list[str] = typer.Option(
        [], "--erased", help="Concept the --model/--unet models erased (repeatable); default --concept: these."
    ),
    probe_param: list[str] = typer.Option([], "--probe-param", help="PROBE.KEY=VALUE probe parameter."),
    set_: list[str] = typer.Option([], "--set", help="key.sub=value override of the run config."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Rows per work unit."),
    cluster: str | None = typer.Option(None, "--cluster", help="Ray address of a running cluster; 'auto'."),
    ship_code: bool | None = typer.Option(
        None, "--ship-code/--no-ship-code", help="Send the engine's code to the workers (default: with --cluster)."
    ),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pickle checkpoints (unsafe)."),
    classifier_dir: Path | None = typer.Option(
        None, "--classifier-dir", help="Latent classifiers for the guidance probes (engine train-classifier)."
    ),
    no_space_check: bool = typer.Option(
        False, "--no-space-check", help="Skip the free-space checks (the hub cache for downloads, the output's size)."
    ),
    track: list[str] = typer.Option(
        [], "--track", help="Log the finished run to an experiment tracker: mlflow (MLFLOW_TRACKING_URI) or wandb "
        "(offline unless WANDB_MODE=online); repeat the flag for both."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Generate (and score) every row of a grid into OUTPUT/rows/*.parquet."""
    from engine.pipeline.grid import expand_run
    from engine.pipeline.run_flags import RunFlags, run_spec_from_flags, unet_override_models

    setup_logging(verbose)
    flags = RunFlags(model=model, concept=concept, probe=probe, num_images=num_images, output=output,
                     shared_output=shared_output, base_model=base_model, unet=unet, method=method, erased=erased,
                     probe_param=probe_param, set_=set_, batch_size=batch_size, allow_pickle=allow_pickle,
                     classifier_dir=classifier_dir, no_space_check=no_space_check, track=track)
    spec, sources = run_spec_from_flags(config, flags)
    check_trackers(spec.tracking, sources.of(("tracking",)))
    check_output_folder(spec.output, sources.of(("output",)))
    check_run_names(spec, sources)
    extra = unet_override_models(spec, flags)
    grid = expand_run(spec, extra_models=extra)
    if spec.space_check:
        require_room_for(grid)
    execute_and_print(grid, cluster, ship_code, on_locked=lambda: print_row_counts(grid),
                      on_done=lambda summary: track_run(grid) if grid.spec.tracking else None)


def track_run(grid) -> None:
    """Log the finished run (its rows may include failed ones) to each tracker of its spec."""
    from engine.tracking.finished_run import log_finished_run

    for line in log_finished_run(grid.spec.output, grid.resolved_config(), grid.spec.tracking):
        typer.echo(line)


def require_room_for(grid) -> None:
    """A local output without room for the run's pending rows stops here, before any work."""
    from engine.pipeline.grid import pending_rows
    from engine.pipeline.space import check_room, require_room
    from engine.results import finished_row_ids

    pending = pending_rows(grid.rows, finished_row_ids(grid.spec.output))
    require_room(check_room(grid, pending), len(pending))


def print_row_counts(grid) -> None:
    """Before any work (the scoring checks passed, the output's lock is held): how many rows each
    model x probe gets."""
    from engine.pipeline.plan import row_count_lines, summary_header

    typer.echo(summary_header(grid))
    for line in row_count_lines(grid):
        typer.echo(line)
    if grid.skipped_models:
        typer.echo(f"  no rows (erased no listed concept): {', '.join(grid.skipped_models)}")


def execute_and_print(grid, cluster: str | None, ship_code: bool | None = None, on_locked=None,
                      on_done=None) -> None:
    """Run the grid and print what happened; exit 3 when rows failed (they are retried by a rerun),
    10-15 when a fault stopped the run (engine.pipeline.faults; the README's exit code table).
    `on_done(summary)` runs after the summary, before that exit (the experiment trackers)."""
    from engine.failures import failures_path
    from engine.pipeline.faults import RunFault
    from engine.pipeline.raynoise import quiet_retry_lines
    from engine.pipeline.run import execute
    from engine.report.summary import print_summary

    try:
        with quiet_retry_lines():
            summary = execute(grid, cluster=cluster, ship_code=ship_code, on_locked=on_locked)
    except RunFault as fault:
        # One line and the counts; the whole trace only with -v (an engine bug's is in OUTPUT/logs).
        if logging.getLogger().isEnabledFor(logging.INFO):
            typer.echo(fault.trace, err=True)
        typer.echo(f"error: {one_line(fault.line)}", err=True)
        typer.echo(fault.counts, err=True)
        raise typer.Exit(code=fault.exit_code) from None
    failed = f", {summary.failed} failed ({failures_path(summary.output)})" if summary.failed else ""
    typer.echo(
        f"{summary.generated} rows generated, {summary.skipped} already done{failed}, "
        f"{summary.total_rows} in {summary.output} ({summary.seconds:.1f} s)"
    )
    if summary.total_rows:
        print_summary(summary.output)
        if on_done is not None:
            on_done(summary)
    if summary.failed:
        rows = "row" if summary.failed == 1 else "rows"
        typer.echo(f"{summary.failed} {rows} failed; run the same command again to retry them", err=True)
        raise typer.Exit(code=3)


@app.command()
@user_errors
def demo(
    output: Path = typer.Option(Path("engine-demo"), "--output", help="Output folder."),
    num_images: int = typer.Option(8, "--num-images", help="Prompts per cell."),
    random_models: bool = typer.Option(False, "--random", help="Random tiny models instead of the toy world."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """The toy world's erased model under four probes (local Ray, CPU, no network): a summary table
    and a report with tables, plots and images."""
    from engine.demo import demo_spec
    from engine.pipeline.grid import expand_run
    from engine.report.build import build_report
    from engine.specs.runs import run_spec_from_dict

    setup_logging(verbose)
    check_output_folder(output, "--output")
    grid = expand_run(run_spec_from_dict(demo_spec(str(output), num_images, random_models), "demo"))
    execute_and_print(grid, None)
    content = build_report([output])
    typer.echo(f"\nreport: {Path(content.output) / 'report.html'} (and report.md beside it)")
