"""The `engine` command line. Each command validates its input, then calls one library function.

User errors print one line and exit with code 2 before Ray or any model starts.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from engine.errors import UserError

# Offline by default on our machines: a hub lookup without network retries for 45 s or more.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Probe whether concepts are really erased.")
probes_app = typer.Typer(no_args_is_help=True, help="List and describe probes.")
app.add_typer(probes_app, name="probes")
toyworld_app = typer.Typer(no_args_is_help=True, help="The toy world: a tiny trained model, judge and erased variants.")
app.add_typer(toyworld_app, name="toyworld")


def user_errors(command):
    """Print a UserError as one line on stderr and exit 2; never a traceback for user input."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except UserError as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(code=2) from None

    return wrapper


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


def _probe_param_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    import yaml

    params: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        probe, dot, name = key.partition(".")
        if not sep or not dot or not name:
            raise UserError(f"--probe-param expects PROBE.KEY=VALUE, got {item!r}")
        params.setdefault(probe, {})[name] = yaml.safe_load(raw)
    return params


@app.command()
@user_errors
def run(
    config: Optional[Path] = typer.Argument(None, help="Run file (YAML grid). Flags below build one instead."),
    model: list[str] = typer.Option([], "--model", help="Model: built-in, configs/models stem, folder or hub id."),
    concept: list[str] = typer.Option([], "--concept", help="Concept slug (repeatable)."),
    probe: list[str] = typer.Option([], "--probe", help="Probe name (repeatable)."),
    num_images: Optional[int] = typer.Option(None, "--num-images", help="Prompts per cell."),
    output: Optional[Path] = typer.Option(None, "--output", help="Output folder."),
    base_model: Optional[str] = typer.Option(None, "--base-model", help="The original, un-erased model."),
    unet: Optional[Path] = typer.Option(None, "--unet", help="Erased UNet on the base model's other parts."),
    method: str = typer.Option("unknown", "--method", help="Erasure method label for --unet models."),
    probe_param: list[str] = typer.Option([], "--probe-param", help="PROBE.KEY=VALUE probe parameter."),
    set_: list[str] = typer.Option([], "--set", help="key.sub=value override of the run config."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Rows per work unit."),
    cluster: Optional[str] = typer.Option(None, "--cluster", help="Ray address of a running cluster; 'auto'."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pickle checkpoints (unsafe)."),
    classifier_dir: Optional[Path] = typer.Option(
        None, "--classifier-dir", help="Latent classifiers for the guidance probes (engine train-classifier)."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Generate (and score) every row of a grid into OUTPUT/rows/*.parquet."""
    from engine.config import apply_overrides, read_yaml, run_spec_from_dict
    from engine.grid import plan_run
    from engine.models import resolve_model, unet_override_spec

    _setup_logging(verbose)
    data: dict[str, Any] = read_yaml(config) if config else {}
    if config and (model or concept or probe):
        raise UserError("give either a run file or --model/--concept/--probe flags, not both")
    if concept:
        data["concepts"] = list(concept)
    if probe:
        data["probes"] = list(probe)
    for field, value in [("output", output), ("num_images", num_images), ("base_model", base_model),
                         ("batch_size", batch_size)]:
        if value is not None:
            data[field] = str(value) if isinstance(value, Path) else value
    if model:
        data["models"] = list(model)
    if allow_pickle:
        data["models"] = [
            resolve_model(m).model_copy(update={"allow_pickle": True}).model_dump() for m in data.get("models", [])
        ]
    overrides = _probe_param_overrides(probe_param)
    if overrides:
        data["probes"] = _merge_probe_params(data.get("probes", []), overrides)
    if classifier_dir is not None:
        data["probes"] = _with_classifier_dir(data.get("probes", []), str(classifier_dir))
    for required, flag in [("output", "--output"), ("num_images", "--num-images"), ("concepts", "--concept"),
                           ("probes", "--probe")]:
        if required not in data and not config:
            raise UserError(f"missing {flag}")
    spec = run_spec_from_dict(apply_overrides(data, set_), str(config) if config else "run flags")
    extra = []
    if unet is not None:
        extra.append(unet_override_spec(str(unet), spec.base_model, method).model_copy(
            update={"allow_pickle": allow_pickle}))
    plan = plan_run(spec, extra_models=extra)
    _execute_and_print(plan, cluster)


def _merge_probe_params(probes: list, overrides: dict[str, dict[str, Any]]) -> list:
    merged = []
    names = []
    for entry in probes:
        entry = {"name": entry} if isinstance(entry, str) else dict(entry)
        names.append(entry["name"])
        entry["params"] = {**entry.get("params", {}), **overrides.get(entry["name"], {})}
        merged.append(entry)
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise UserError(f"--probe-param names probe {unknown[0]!r}, which is not in this run ({', '.join(names)})")
    return merged


def _with_classifier_dir(probes: list, classifier_dir: str) -> list:
    """--classifier-dir: the classifier_dir param of every probe that has one, unless set already."""
    from engine.probe import get_probe_class

    updated, used = [], False
    for entry in probes:
        entry = {"name": entry} if isinstance(entry, str) else dict(entry)
        if "classifier_dir" in get_probe_class(entry["name"]).params_class.model_fields:
            entry["params"] = {"classifier_dir": classifier_dir, **entry.get("params", {})}
            used = True
        updated.append(entry)
    if not used:
        raise UserError("--classifier-dir: no probe of this run uses latent classifiers")
    return updated


def _execute_and_print(plan, cluster: Optional[str]) -> None:
    from engine.run import execute
    from engine.summary import print_summary

    summary = execute(plan, cluster=cluster)
    typer.echo(
        f"{summary.generated} rows generated, {summary.skipped} already done, "
        f"{summary.total_rows} in {summary.output} ({summary.seconds:.1f} s)"
    )
    print_summary(summary.output)


@app.command()
@user_errors
def demo(
    output: Path = typer.Option(Path("engine-demo"), "--output", help="Output folder."),
    num_images: int = typer.Option(8, "--num-images", help="Prompts per cell."),
    random_models: bool = typer.Option(False, "--random", help="Random tiny models instead of the toy world."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """The toy world's erased model under four probes (local Ray, CPU, no network): a summary table
    and a report with tables, plots and images."""
    from engine.config import run_spec_from_dict
    from engine.demo import demo_spec
    from engine.grid import plan_run
    from engine.report import build_report

    _setup_logging(verbose)
    plan = plan_run(run_spec_from_dict(demo_spec(str(output), num_images, random_models), "demo"))
    _execute_and_print(plan, None)
    content = build_report([output])
    typer.echo(f"\nreport: {content.output / 'report.html'} (and report.md beside it)")


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
    from engine.config import DEFAULT_BASE_MODEL

    _setup_logging(verbose)
    settings = TrainSettings(epochs=epochs, batch_size=batch_size, learning_rate=lr, timestep_power=timestep_power,
                             seed=seed)
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
    typer.echo(f"requires: {', '.join(sorted(probe_class.requires)) or 'nothing'}\n")
    for field, annotation, default, description in describe_params(probe_class.params_class):
        typer.echo(f"  {field:24s} {annotation:18s} default {default:24s} {description}")


@app.command()
@user_errors
def concepts():
    """Concepts found in the config folders."""
    from engine.config import available_concepts, load_concept

    for name in sorted(available_concepts()):
        spec = load_concept(name)
        typer.echo(f"{name:28s} {spec.kind:7s} {spec.prompt}")


@app.command()
@user_errors
def models():
    """Built-in models and configs/models entries."""
    from engine.builtin_models import BUILTIN_MODELS
    from engine.models import available_models

    for name in available_models():
        note = BUILTIN_MODELS[name].description if name in BUILTIN_MODELS else "configs/models"
        typer.echo(f"{name:28s} {note}")


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


def _judge_option_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    import yaml

    options: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        judge, dot, name = key.partition(".")
        if not sep or not dot or not name:
            raise UserError(f"--judge-option expects JUDGE.KEY=VALUE, got {item!r}")
        options.setdefault(judge, {})[name] = yaml.safe_load(raw)
    return options


@app.command()
@user_errors
def score(
    run_dir: Path = typer.Argument(..., help="Run folder written by `engine run`."),
    judge: list[str] = typer.Option(..., "--judge", help="Judge NAME or NAME:PRESET (repeatable), e.g. clip."),
    judge_option: list[str] = typer.Option([], "--judge-option", help="JUDGE.KEY=VALUE judge option."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Images per judge call."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Add or replace scores of an existing run in place, without regenerating images."""
    from engine.scoring.registry import parse_judge_ref
    from engine.scoring.rescore import rescore_run

    _setup_logging(verbose)
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda, got {device!r}")
    requests = [parse_judge_ref(ref) for ref in judge]
    options = _judge_option_overrides(judge_option)
    unknown = sorted(set(options) - {r.name for r in requests})
    if unknown:
        raise UserError(f"--judge-option names judge {unknown[0]!r}, which is not given with --judge")
    requests = [r.model_copy(update={"options": {**r.options, **options.get(r.name, {})}}) for r in requests]
    summary = rescore_run(run_dir, requests, device, batch_size)
    typer.echo(
        f"scored {summary.rows} rows in {summary.files} files of {summary.output} with "
        f"{', '.join(summary.judges)} ({summary.seconds:.1f} s)"
    )


@app.command()
@user_errors
def report(
    run_dirs: list[Path] = typer.Argument(..., help="Run folders; several are merged into one report."),
    output: Optional[Path] = typer.Option(None, "--output", help="Report folder; default RUN_DIR/report."),
    max_images: int = typer.Option(12, "--max-images", min=1, help="Images per cell in the contact sheets."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Recovery tables with 95% CIs, plots and image grids: report.md, report.html, summary.parquet/.csv."""
    from engine.report import build_report

    _setup_logging(verbose)
    content = build_report(run_dirs, output, max_images)
    typer.echo(f"report of {content.rows} rows in {len(content.cells)} cells: {content.output / 'report.html'}")


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

    _setup_logging(True)
    settings = BuildSettings.tiny() if tiny else BuildSettings()
    if minutes is not None:
        settings = settings.with_budget(minutes)
    report = build_toy_world(output, settings, WEIGHTS_DIR if export else None, threads=threads,
                             log_file=output / "build.log")
    typer.echo(f"toy world built in {report['total_seconds_this_run']:.0f} s; report: {output / 'build_report.json'}")


@app.command()
@user_errors
def tune(
    config: Optional[Path] = typer.Argument(None, help="Tune config (YAML); default: configs/tune/<--probe>.yaml."),
    model: list[str] = typer.Option([], "--model", help="Model to search (repeatable; one search per pair)."),
    concept: list[str] = typer.Option([], "--concept", help="Concept slug (repeatable)."),
    probe: Optional[str] = typer.Option(None, "--probe", help="Probe whose params are searched."),
    num_samples: Optional[int] = typer.Option(None, "--num-samples", min=1, help="Trials per (model, concept)."),
    num_images: Optional[int] = typer.Option(None, "--num-images", min=1, help="Prompts per trial."),
    algorithm: Optional[str] = typer.Option(None, "--algorithm", help="tpe (default), random or grid."),
    objective: Optional[str] = typer.Option(None, "--objective", help="judge_top1, judge_target_prob, clip_score."),
    output: Optional[Path] = typer.Option(None, "--output", help="Output folder (trials.parquet, best_*.yaml)."),
    set_: list[str] = typer.Option([], "--set", help="key.sub=value override of the tune config."),
    cluster: Optional[str] = typer.Option(None, "--cluster", help="Ray address of a running cluster; 'auto'."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Search a probe's params for the setting that recovers the concept most (Ray Tune)."""
    from engine.tune import execute_tune, plan_tune, summary_lines
    from engine.tune_space import load_tune_spec

    _setup_logging(verbose)
    flags = {"models": model, "concepts": concept, "probe": probe, "num_samples": num_samples,
             "num_images": num_images, "algorithm": algorithm, "objective": objective,
             "output": str(output) if output else None}
    spec, where = load_tune_spec(config, flags, set_)
    summary = execute_tune(plan_tune(spec, where), cluster)
    for line in summary_lines(summary):
        typer.echo(line)


if __name__ == "__main__":
    app()
