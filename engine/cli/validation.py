"""Checks the commands run on their input before any work starts, each failing with one line that
names the flag or file the bad value came from."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from engine.errors import UserError

if TYPE_CHECKING:
    from engine.specs.runs import RunSpec
    from engine.specs.sources import Sources


def check_output_folder(path: str | Path, source: str) -> None:
    """An output folder we can create or write into: not an existing file, not below a file, and
    writable. Checked up front, so a typo fails in a second instead of after Ray has started. A URI
    (s3://...) is checked for a file system that can open it; whether the bucket takes writes shows
    when the run takes the output's lock, still before any work."""
    if "://" in str(path):
        from engine.storage import output_location

        try:
            location = output_location(path)
        except UserError as error:
            raise UserError(f"{source}: {error}") from None
        if not location.is_local:
            return
        path = location.local_path()
    try:
        path = Path(path).expanduser()
        if path.exists() and not path.is_dir():
            raise UserError(f"{source}: {path} exists and is not a folder; give a folder path")
        existing = path
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise UserError(f"{source}: cannot create {path}: {existing} is a file, not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            what = "" if existing == path else f" ({existing} does not let us create it)"
            raise UserError(f"{source}: {path} is not writable{what}")
    except (OSError, ValueError) as exc:  # a NUL byte, an over-long name, a permission on a parent
        reason = getattr(exc, "strerror", None) or exc
        raise UserError(f"{source}: {str(path)!r} is not a usable folder path ({reason})") from None


def check_run_names(spec: RunSpec, sources: Sources) -> None:
    """Every model, concept and probe name and every probe param of a run spec, each error led by
    where the value was written (a flag, `--set`, a run file line). engine.pipeline.grid.expand_run
    checks the same again; this only makes the first failure name its source."""
    from engine.models.builtin import BUILTIN_MODELS
    from engine.models.families import model_families
    from engine.models.resolve import resolve_model
    from engine.probe import get_probe_class, parse_params
    from engine.specs.concepts import load_concept
    from engine.specs.runs import probe_requests

    families = model_families()
    for index, ref in enumerate(spec.models):
        if isinstance(ref, str) and ref in families and ref not in BUILTIN_MODELS:
            continue  # a family: expand_run checks the weights of the members that get rows
        _blamed(sources.of(("models", index)), resolve_model, ref)
    for index, name in enumerate(spec.concepts):
        _blamed(sources.of(("concepts", index)), load_concept, name)
    for index, request in enumerate(probe_requests(spec)):
        _blamed(sources.of(("probes", index)), get_probe_class, request.name)
        parse_params(request.name, request.params, _param_source(sources, index))


def _param_source(sources: Sources, index: int) -> Callable[[tuple], str]:
    """Where the value at `loc` of probe `index`'s params was written."""
    return lambda loc: sources.of(("probes", index, "params", *loc))


def _blamed(source: str, check, *args):
    try:
        return check(*args)
    except UserError as error:
        raise UserError(f"{source}: {error}") from None
