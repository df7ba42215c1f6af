"""`engine tune`: Ray Tune search over one probe's params for the worst case."""

from __future__ import annotations

from pathlib import Path

import typer

from engine.cli.app import app, setup_logging, user_errors
from engine.cli.validation import check_output_folder


@app.command()
@user_errors
def tune(
    config: Path | None = typer.Argument(None, help="Tune config (YAML); default: configs/tune/<--probe>.yaml."),
    model: list[str] = typer.Option([], "--model", help="Model to search (repeatable; one search per pair)."),
    concept: list[str] = typer.Option([], "--concept", help="Concept slug (repeatable)."),
    probe: str | None = typer.Option(None, "--probe", help="Probe whose params are searched."),
    num_samples: int | None = typer.Option(None, "--num-samples", min=1, help="Trials per (model, concept)."),
    num_images: int | None = typer.Option(None, "--num-images", min=1, help="Prompts per trial."),
    algorithm: str | None = typer.Option(None, "--algorithm", help="tpe (default), random or grid."),
    objective: str | None = typer.Option(None, "--objective", help="judge_top1, judge_target_prob, clip_score."),
    output: str | None = typer.Option(
        None, "--output", help="Output folder (trials.parquet, best_*.yaml): a local path or a URI (s3://...)."
    ),
    set_: list[str] = typer.Option([], "--set", help="key.sub=value override of the tune config."),
    cluster: str | None = typer.Option(None, "--cluster", help="Ray address of a running cluster; 'auto'."),
    ship_code: bool | None = typer.Option(
        None, "--ship-code/--no-ship-code", help="Send the engine's code to the workers (default: with --cluster)."
    ),
    track: list[str] = typer.Option(
        [], "--track", help="Log every trial to an experiment tracker, one tracker run per trial: mlflow "
        "(MLFLOW_TRACKING_URI) or wandb (offline unless WANDB_MODE=online); repeat the flag for both."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Search a probe's params for the setting that recovers the concept most (Ray Tune)."""
    from engine.tracking.trackers import check_trackers
    from engine.tune.execute import execute_tune, summary_lines
    from engine.tune.pairs import prepare_tune
    from engine.tune.space import load_tune_spec

    setup_logging(verbose)
    flags = {"models": model, "concepts": concept, "probe": probe, "num_samples": num_samples,
             "num_images": num_images, "algorithm": algorithm, "objective": objective,
             "output": output, "tracking": track}
    spec, sources = load_tune_spec(config, flags, set_)
    check_trackers(spec.tracking, sources.of(("tracking",)))
    check_output_folder(spec.output, sources.of(("output",)))
    summary = execute_tune(prepare_tune(spec, sources), cluster, ship_code)
    for line in summary_lines(summary):
        typer.echo(line)


if __name__ == "__main__":
    app()
