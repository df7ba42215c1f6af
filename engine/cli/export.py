"""`engine export RUN_DIR --format hf DIR [--push-to-hub REPO]`: a run as a Hugging Face dataset."""

from __future__ import annotations

from pathlib import Path

import typer

from engine.cli.app import app, setup_logging, user_errors
from engine.errors import UserError

FORMATS = ("hf",)


@app.command()
@user_errors
def export(
    run_dir: str = typer.Argument(..., help="Run folder written by `engine run` (a path or a URI)."),
    destination: Path = typer.Argument(..., help="New or empty local folder to write the dataset into."),
    format_: str = typer.Option("hf", "--format", help="hf: Parquet with an Image feature and a dataset card."),
    repo: str | None = typer.Option(None, "--push-to-hub", help="Also upload to this hub dataset (OWNER/NAME)."),
    private: bool = typer.Option(False, "--private", help="With --push-to-hub: create the repo private."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Export a run's rows and a dataset card that `datasets.load_dataset("parquet", data_dir=DIR)` opens."""
    from engine.export.hf import check_export_folder, export_hf
    from engine.export.push import check_push, push_to_hub
    from engine.results import require_run_folder

    setup_logging(verbose)
    if format_ not in FORMATS:
        raise UserError(f"--format {format_}: unknown format; formats: {', '.join(FORMATS)}")
    if "://" in str(destination):
        raise UserError(f"{destination}: export into a local folder (push it with --push-to-hub)")
    require_run_folder(run_dir)
    check_export_folder(destination)
    if repo is not None:
        check_push(repo)
    done = export_hf(run_dir, destination)
    typer.echo(f"exported {done.rows} rows in {done.files} files with README.md to {done.folder}")
    if repo is not None:
        typer.echo(f"pushed to {push_to_hub(destination, repo, private)}")
