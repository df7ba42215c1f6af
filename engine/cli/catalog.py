"""What the engine knows: `engine probes list|describe`, `engine concepts`, `engine models`, `engine judges`."""

from __future__ import annotations

import sys

import typer

from engine.cli.app import app, probes_app, user_errors

DEVIATIONS = "docs/deviations.md"  # in the project's repository: every deliberate difference, why, which way


@probes_app.command("list")
@user_errors
def probes_list():
    """Registered probes, with what each requires."""
    from engine.probe import get_probe_class, probe_names

    for name in probe_names():
        probe_class = get_probe_class(name)
        requires = ", ".join(sorted(probe_class.requires)) or "-"
        summary = (sys.modules[probe_class.__module__].__doc__ or "").strip().splitlines()[0]
        typer.echo(f"{name:28s} requires: {requires:30s} {summary}")


@probes_app.command("describe")
@user_errors
def probes_describe(name: str = typer.Argument(..., help="Probe name.")):
    """A probe's parameters with their types, defaults and descriptions."""
    from engine.probe import describe_params, get_probe_class

    probe_class = get_probe_class(name)
    typer.echo(f"{name}: {(sys.modules[probe_class.__module__].__doc__ or '').strip()}\n")
    typer.echo(f"Where and why it differs from the original code: {DEVIATIONS}#{name}\n")
    typer.echo(f"requires: {', '.join(sorted(probe_class.requires)) or 'nothing'}\n")
    for field, annotation, default, description in describe_params(probe_class.params_class):
        typer.echo(f"  {field:24s} {annotation:18s} default {default:24s} {description}")


@app.command()
@user_errors
def concepts():
    """Concepts found in the config folders, with where each came from ($ENGINE_CONFIG_DIR, ./configs, shipped)."""
    from engine.concepts import available_concepts, find_config_entries, load_concept

    entries = find_config_entries("concepts")
    for name in sorted(available_concepts()):
        spec = load_concept(name)
        typer.echo(f"{name:28s} {spec.kind:7s} {spec.prompt:44s} {entries[name].source}")


@app.command()
@user_errors
def models():
    """Built-in models and configs/models entries, with where each came from."""
    from engine.builtin_models import BUILTIN_MODELS
    from engine.concepts import find_config_entries, read_yaml
    from engine.models import available_models

    entries = find_config_entries("models")
    for name in available_models():
        if name in BUILTIN_MODELS:
            source, note = "built-in", BUILTIN_MODELS[name].description
        else:
            source, note = entries[name].source, str(read_yaml(entries[name].path).get("pretrained", ""))
        typer.echo(f"{name:28s} {note:68s} {source}")


@app.command()
@user_errors
def judges():
    """Registered judges with their presets and options."""
    from engine.probe import describe_params
    from engine.scoring.registry import get_judge_class, judge_names

    for name in judge_names():
        judge_class = get_judge_class(name)
        summary = (sys.modules[judge_class.__module__].__doc__ or "").strip().splitlines()[0]
        typer.echo(f"{name}  (presets: {', '.join(judge_class.presets) or '-'})  {summary}")
        for field, annotation, default, description in describe_params(judge_class.options_class):
            typer.echo(f"  {field:12s} {annotation:14s} default {default:16s} {description}")
