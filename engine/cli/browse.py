"""`engine browse RUN_DIR [RUN_DIR...]`: a local, read-only web app over the runs' images."""

from __future__ import annotations

import typer

from engine.cli.app import app, setup_logging, user_errors
from engine.errors import UserError


@app.command()
@user_errors
def browse(
    run_dirs: list[str] = typer.Argument(..., help="Run folders (paths or URIs); several are shown together."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0 exposes it to the network)."),
    port: int = typer.Option(8765, "--port", min=1, max=65535, help="Port to listen on."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Browse a grid: methods x concepts per probe, each cell's images beside the base model's."""
    import importlib.util

    from engine.results import require_run_folder

    setup_logging(verbose)
    for run_dir in run_dirs:
        require_run_folder(run_dir)
    missing = [name for name in ("starlette", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"engine browse needs {' and '.join(missing)}: pip install -e \".[browse]\"")
    import uvicorn

    from engine.browse.app import create_app
    from engine.browse.data import BrowseData

    data = BrowseData(run_dirs)
    typer.echo(f"{len(data.frame)} rows in {len(data.cells)} cells: http://{host}:{port}/ (Ctrl-C stops)")
    uvicorn.run(create_app(data), host=host, port=port, log_level="info" if verbose else "warning")
