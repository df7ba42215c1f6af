"""The typer app of the `engine` command, and what its commands share: one-line user errors,
logging set-up and the one KEY=VALUE parser of the option flags."""

from __future__ import annotations

import functools
import logging
import os

import typer

from engine.errors import UserError

# Our machines are offline and Ray's token auth is off; set before anything imports Ray.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Probe whether concepts are really erased.")
probes_app = typer.Typer(no_args_is_help=True, help="List and describe probes.")
app.add_typer(probes_app, name="probes")
toyworld_app = typer.Typer(no_args_is_help=True, help="The toy world: a tiny trained model, judge and erased variants.")
app.add_typer(toyworld_app, name="toyworld")


def _print_version(value: bool) -> None:
    if value:
        from engine import __version__

        typer.echo(f"engine {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the engine's version and exit."
    ),
) -> None:
    """Probe whether concepts are really erased."""


def user_errors(command):
    """Print a UserError as one line on stderr and exit 2; never a traceback for user input."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except UserError as error:
            typer.echo(f"error: {one_line(str(error))}", err=True)
            raise typer.Exit(code=2) from None

    return wrapper


# Every character str.splitlines() breaks at: a key or value the user wrote may hold one.
_LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


def one_line(message: str) -> str:
    """The message with line breaks escaped (a quoted bad value may contain one), so it stays one line."""
    return message.translate({ord(c): ascii(c)[1:-1] for c in _LINE_BREAKS})


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
