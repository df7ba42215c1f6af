"""The `engine` command line. Each command validates its input, then calls one library function;
user errors print one line and exit with code 2 before Ray or any model starts.

One module per group of commands; importing them registers their commands on `app`.
"""

from engine.cli import (  # noqa: F401  (registers the commands)
    browse,
    catalog,
    classifiers,
    export,
    plan,
    results,
    run,
    training,
    tune,
    warm,
)
from engine.cli.app import app

__all__ = ["app"]
