"""`engine import-classifier`: the authors' published latent classifiers in the engine's format."""

from __future__ import annotations

from pathlib import Path

import typer

from engine.cli.app import app, setup_logging, user_errors


@app.command("import-classifier")
@user_errors
def import_classifier(
    sources: list[str] = typer.Argument(
        ..., help="Original .pt files or hub ids DiffusionConceptErasure/latent-classifier-<concept>."
    ),
    output_dir: Path = typer.Option(Path("classifiers"), "--output-dir", help="Writes <concept>.safetensors/.json."),
    concept: str | None = typer.Option(
        None, "--concept", help="Concept slug (default: from the hub id or the file name); one source only."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Convert the original code's latent classifiers (.pt, read weights-only) for the guidance probes.

    Hub ids resolve through the local Hugging Face cache (with HF_HUB_OFFLINE=1 nothing is
    downloaded). Each converted classifier must give the original's logits on a fixed input before
    it is written."""
    from engine.errors import UserError
    from engine.guidance.original_classifier import import_classifier as convert

    setup_logging(verbose)
    if concept is not None and len(sources) > 1:
        raise UserError("--concept names the concept of one source; give one source per call")
    for source in sources:
        summary = convert(source, output_dir, concept)
        shape = "x".join(map(str, summary["latent_shape"]))
        typer.echo(
            f"{summary['concept']:24s} {summary['path']}  from {summary['source']}  latents {shape}, "
            f"logits match (max |diff| {summary['max_abs_difference']:.2g})"
        )
