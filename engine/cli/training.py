"""Commands that train: `engine train-classifier` and `engine toyworld build`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import typer

from engine.cli.app import app, setup_logging, toyworld_app, user_errors
from engine.cli.validation import check_output_folder
from engine.errors import UserError


@app.command("train-classifier")
@user_errors
def train_classifier(
    labels: list[str] = typer.Argument(..., help='Concept labels, e.g. "church, church building" airliner.'),
    output_dir: Path = typer.Option(Path("classifiers"), "--output-dir", help="Writes <concept>.safetensors/.json."),
    epochs: int = typer.Option(70, "--epochs", min=1, help="Training epochs (the original: 70)."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Clean latents per batch (x7 noised copies)."),
    lr: float = typer.Option(1e-4, "--lr", min=0.0, help="AdamW learning rate."),
    timestep_power: float = typer.Option(3.0, "--timestep-power", min=0.01, help="t = floor(u^(1/p) * 999)."),
    positive_dir: Optional[Path] = typer.Option(
        None, "--positive-dir", help="Positive images: DIR/<concept>/ per label, or DIR itself for one label."
    ),
    negative_dir: Optional[Path] = typer.Option(None, "--negative-dir", help="Negative images for every label."),
    model: Optional[str] = typer.Option(
        None, "--model", help="VAE, noise schedule and generated images (default: the base model, SD 1.4)."
    ),
    num_images: int = typer.Option(100, "--num-images", min=1, help="Generated images per concept."),
    negative_concept: list[str] = typer.Option(
        [], "--negative-concept", help="Concepts whose generated images are negatives (default: all others)."
    ),
    num_inference_steps: int = typer.Option(50, "--num-inference-steps", min=1, help="Steps when generating."),
    seed: int = typer.Option(42, "--seed", help="Seed of the split, initialisation and noise draws."),
    cluster: Optional[str] = typer.Option(None, "--cluster", help="Ray address of a running cluster; 'auto'."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Train time-conditioned latent classifiers (one per concept, in parallel) for classifier guidance."""
    from classifier_training.jobs import TrainRequest, train_classifiers
    from classifier_training.train import TrainSettings
    from engine.concepts import Sources, validate
    from engine.config import DEFAULT_BASE_MODEL

    setup_logging(verbose)
    check_output_folder(output_dir, "--output-dir")
    sources = Sources("train-classifier flags")
    for key, flag in [("learning_rate", "--lr"), ("timestep_power", "--timestep-power"), ("epochs", "--epochs"),
                      ("batch_size", "--batch-size"), ("seed", "--seed")]:
        sources.record(key, flag)
    settings = validate(TrainSettings, {"epochs": epochs, "batch_size": batch_size, "learning_rate": lr,
                                        "timestep_power": timestep_power, "seed": seed}, sources)
    request = TrainRequest(labels=list(labels), output_dir=output_dir, settings=settings,
                           model=model or DEFAULT_BASE_MODEL,
                           positive_dir=positive_dir, negative_dir=negative_dir,
                           negative_concepts=list(negative_concept), num_images=num_images,
                           num_inference_steps=num_inference_steps, cluster=cluster)
    for summary in train_classifiers(request):
        typer.echo(
            f"{summary['concept']:24s} {summary['path']}  best epoch {summary['best_epoch']}: val loss "
            f"{summary['val_loss']:.4f}, ROC-AUC {summary['roc_auc']:.3f}, PR-AUC {summary['pr_auc']:.3f}, "
            f"TPR@5%FPR {summary['tpr_at_5_fpr']:.3f}"
        )


@toyworld_app.command("build")
@user_errors
def toyworld_build(
    output: Path = typer.Option(Path("toyworld-build"), "--output", help="Work folder (stages resume from it)."),
    minutes: Optional[float] = typer.Option(None, "--minutes", min=1, help="Wall-time cap per stage, from a total."),
    threads: int = typer.Option(1, "--threads", min=1, help="torch CPU threads (1 leaves a core for others)."),
    tiny: bool = typer.Option(False, "--tiny", help="Tiny sizes, a few steps: checks the code in seconds."),
    export: bool = typer.Option(True, "--export/--no-export", help="Write the shipped weights into the package."),
):
    """Train the toy world from scratch (seeded): judge, VAE, diffusion model, erased variants."""
    from engine.toyworld.build import WEIGHTS_DIR, BuildSettings, build_toy_world

    setup_logging(True)
    if minutes is not None and not math.isfinite(minutes):
        raise UserError(f"--minutes must be a finite number of minutes, got {minutes}")
    settings = BuildSettings.tiny() if tiny else BuildSettings()
    if minutes is not None:
        settings = settings.with_budget(minutes)
    report = build_toy_world(output, settings, WEIGHTS_DIR if export else None, threads=threads,
                             log_file=output / "build.log")
    typer.echo(f"toy world built in {report['total_seconds_this_run']:.0f} s; report: {output / 'build_report.json'}")
