"""`engine up` / `engine down`: a warm local Ray that later runs on this machine attach to (engine.pipeline.warm)."""

from __future__ import annotations

import typer

from engine.cli.app import app, setup_logging, user_errors


@app.command()
@user_errors
def up(
    dashboard: bool = typer.Option(False, "--dashboard", help="Start Ray's dashboard too (off: it costs a process)."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Start a local Ray and keep it: later `engine run` / `engine tune` without --cluster use it."""
    from engine.pipeline.warm import start, state_path

    setup_logging(verbose)
    state = start(dashboard)
    verb = "already running" if state.get("already_running") else "started"
    typer.echo(f"warm local Ray {verb} at {state['address']} (pid {state['pid']}, state in {state_path()})")
    if state.get("dashboard_url"):
        typer.echo(f"Ray dashboard: http://{str(state['dashboard_url']).removeprefix('http://')}")
    typer.echo("later `engine run` / `engine tune` on this machine use it; `engine down` stops it")


@app.command()
@user_errors
def down(verbose: bool = typer.Option(False, "--verbose", "-v")):
    """Stop the local Ray that `engine up` started (no other Ray on the machine)."""
    from engine.pipeline.warm import stop

    setup_logging(verbose)
    state = stop()
    typer.echo("no warm local Ray was running" if state is None else
               f"stopped the warm local Ray at {state['address']} (pid {state['pid']})")
