"""`engine run` and `engine demo`: build a run spec from a file or flags, plan it, execute it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from engine.cli.app import app, parse_owner_key_values, setup_logging, user_errors
from engine.errors import UserError


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
    ship_code: Optional[bool] = typer.Option(
        None, "--ship-code/--no-ship-code", help="Send the engine's code to the workers (default: with --cluster)."
    ),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pickle checkpoints (unsafe)."),
    classifier_dir: Optional[Path] = typer.Option(
        None, "--classifier-dir", help="Latent classifiers for the guidance probes (engine train-classifier)."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Generate (and score) every row of a grid into OUTPUT/rows/*.parquet."""
    from engine.concepts import read_yaml
    from engine.config import apply_overrides, run_spec_from_dict
    from engine.models import resolve_model, unet_override_spec
    from engine.pipeline.grid import plan_run

    setup_logging(verbose)
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
    overrides = parse_owner_key_values(probe_param, "--probe-param", "PROBE")
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
    execute_and_print(plan, cluster, ship_code)


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


def execute_and_print(plan, cluster: Optional[str], ship_code: Optional[bool] = None) -> None:
    from engine.pipeline.run import execute
    from engine.report.summary import print_summary

    summary = execute(plan, cluster=cluster, ship_code=ship_code)
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
    from engine.pipeline.grid import plan_run
    from engine.report.build import build_report

    setup_logging(verbose)
    plan = plan_run(run_spec_from_dict(demo_spec(str(output), num_images, random_models), "demo"))
    execute_and_print(plan, None)
    content = build_report([output])
    typer.echo(f"\nreport: {content.output / 'report.html'} (and report.md beside it)")
