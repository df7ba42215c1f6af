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
    from engine.specs.concepts import available_concepts, load_concept
    from engine.specs.files import find_config_entries

    entries = find_config_entries("concepts")
    for name in sorted(available_concepts()):
        spec = load_concept(name)
        typer.echo(f"{name:28s} {spec.kind:7s} {spec.prompt:44s} {entries[name].source}")


@app.command()
@user_errors
def models():
    """Built-in models, configs/models entries and model families' members: the method each is
    labelled with, the concepts it erased, its weights and where its entry came from."""
    from engine.models.builtin import BUILTIN_MODELS
    from engine.models.families import model_families, model_files
    from engine.models.resolve import resolve_model
    from engine.specs.files import find_config_entries

    def line(name: str, method: str, erased: list[str], weights: str, source: str) -> str:
        return f"{name:30s} {method:10s} {', '.join(erased) or '-':26s} {weights:56s} {source}"

    entries = find_config_entries("models")
    typer.echo(line("model", "method", ["erased"], "what", "source"))
    for name, builtin in sorted(BUILTIN_MODELS.items()):
        typer.echo(line(name, builtin.method, list(builtin.erased), builtin.description, "built-in"))
    for name in sorted(model_files()[0]):
        spec = resolve_model(name, check_source=False)
        typer.echo(line(name, spec.method_label, spec.erased, spec.unet or spec.pretrained, entries[name].source))
    for family in model_families().values():
        members = family.members()
        typer.echo(f"family {family.name} ({len(family.methods)} methods x {len(family.concepts)} concepts, "
                   f"{len(members)} models; `models: [{family.name}]` lists them all): {family.description}")
        for name, spec in members.items():
            typer.echo(line(name, spec.method_label, spec.erased, spec.unet or spec.pretrained,
                            entries[family.name].source))


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
