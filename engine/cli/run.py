"""`engine run` and `engine demo`: build a run spec from a file or flags, plan it, execute it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from engine.cli.app import app, parse_owner_key_values, setup_logging, user_errors
from engine.cli.validation import check_output_folder, check_run_names
from engine.errors import UserError


@app.command()
@user_errors
def run(
    config: Optional[Path] = typer.Argument(None, help="Run file (YAML grid). Flags below build one instead."),
    model: list[str] = typer.Option([], "--model", help="Model: built-in, configs/models stem, folder or hub id."),
    concept: list[str] = typer.Option([], "--concept", help="Concept slug (repeatable)."),
    probe: list[str] = typer.Option([], "--probe", help="Probe name (repeatable)."),
    num_images: Optional[int] = typer.Option(None, "--num-images", help="Prompts per cell."),
    output: Optional[str] = typer.Option(
        None, "--output", help="Output folder: a local path or a URI (s3://bucket/run, gs://, abfs://, local://)."
    ),
    shared_output: bool = typer.Option(
        False, "--shared-output", help="The local --output is on storage every cluster node sees (NFS...)."
    ),
    base_model: Optional[str] = typer.Option(None, "--base-model", help="The original, un-erased model."),
    unet: Optional[Path] = typer.Option(None, "--unet", help="Erased UNet on the base model's other parts."),
    method: Optional[str] = typer.Option(
        None, "--method", help="Erasure method label of the --model/--unet models (default: theirs, else unknown)."
    ),
    erased: list[str] = typer.Option(
        [], "--erased", help="Concept the --model/--unet models erased (repeatable); default --concept: these."
    ),
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
    from engine.concepts import Sources, read_yaml_with_sources
    from engine.config import ModelSpec, apply_overrides, run_spec_from_dict
    from engine.models import expand_model_refs, unet_override_spec
    from engine.pipeline.grid import plan_run

    setup_logging(verbose)
    # `sources` records where each key came from (file line, flag, --set), so errors name it.
    data, sources = read_yaml_with_sources(config) if config else ({}, Sources("run flags"))
    if config and (model or concept or probe):
        raise UserError("give either a run file or --model/--concept/--probe flags, not both")
    labels = _labels(method, erased)
    if labels and not (model or unet):
        raise UserError("--method and --erased label the --model or --unet models; give one (a run file's models "
                        "say theirs in configs/models)")
    if concept:
        data["concepts"] = list(concept)
        sources.record("concepts", "--concept")
    elif erased and not config:
        data["concepts"] = list(erased)
        sources.record("concepts", "--erased")
    if probe:
        data["probes"] = list(probe)
        sources.record("probes", "--probe")
    for field, value in [("output", output), ("num_images", num_images), ("base_model", base_model),
                         ("batch_size", batch_size)]:
        if value is not None:
            data[field] = str(value) if isinstance(value, Path) else value
            sources.record(field, "--" + field.replace("_", "-"))
    if model:
        data["models"] = [_labelled(m, labels) for m in model] if labels else list(model)
        sources.record("models", "--model")
    if allow_pickle and isinstance(data.get("models"), list):
        # Mappings stay mappings, so the run spec's validation still names the file line of a bad key.
        data["models"] = [{**m, "allow_pickle": True} if isinstance(m, dict)
                          else _labelled(m, {"allow_pickle": True}) if isinstance(m, (str, ModelSpec)) else m
                          for m in expand_model_refs(data["models"])]
    overrides = parse_owner_key_values(probe_param, "--probe-param", "PROBE")
    if overrides:
        data["probes"] = _merge_probe_params(data.get("probes", []), overrides, probe_param, sources)
    if classifier_dir is not None:
        data["probes"] = _with_classifier_dir(data.get("probes", []), str(classifier_dir), sources)
    if shared_output:
        data["shared_output"] = True
        sources.record("shared_output", "--shared-output")
    for required, flag in [("output", "--output"), ("num_images", "--num-images"), ("concepts", "--concept"),
                           ("probes", "--probe")]:
        if required not in data and not config:
            raise UserError(f"missing {flag}")
    spec = run_spec_from_dict(apply_overrides(data, set_, sources), sources)
    check_output_folder(spec.output, sources.of(("output",)))
    check_run_names(spec, sources)
    extra = []
    if unet is not None:
        extra.append(unet_override_spec(str(unet), spec.base_model, method, erased).model_copy(
            update={"allow_pickle": allow_pickle}))
    plan = plan_run(spec, extra_models=extra)
    execute_and_print(plan, cluster, ship_code, on_locked=lambda: print_row_counts(plan))


def _labels(method: Optional[str], erased: list[str]) -> dict[str, Any]:
    labels: dict[str, Any] = {}
    if method is not None:
        labels["method"] = method
    if erased:
        labels["erased"] = list(erased)
    return labels


def _labelled(ref, labels: dict[str, Any]) -> dict[str, Any]:
    """A model reference (name, spec or spec mapping) with `labels` applied (they replace its own)."""
    from engine.concepts import validate
    from engine.config import ModelSpec
    from engine.model_families import model_families
    from engine.models import resolve_model

    if isinstance(ref, str) and ref in model_families():
        raise UserError(f"--method/--erased cannot label {ref!r}: it is a family, whose members label themselves")
    spec = resolve_model(validate(ModelSpec, ref, "model entry") if isinstance(ref, dict) else ref,
                         check_source=False)
    return validate(ModelSpec, {**spec.model_dump(mode="json"), **labels}, "model flags").model_dump(mode="json")


def print_row_counts(plan) -> None:
    """Before any work (the scoring checks passed, the output's lock is held): how many rows each
    model x probe gets."""
    from engine.pipeline.plan_cost import row_count_lines, summary_header

    typer.echo(summary_header(plan))
    for line in row_count_lines(plan):
        typer.echo(line)
    if plan.skipped_models:
        typer.echo(f"  no rows (erased no listed concept): {', '.join(plan.skipped_models)}")


def _probe_entries(probes: Any) -> list[tuple[int, dict[str, Any]]]:
    """(index, entry as a dict) of each well-formed probe entry (a name, or a mapping with a string
    name and mapping params); malformed ones are left to the run spec's validation to report."""
    if not isinstance(probes, list):
        return []
    entries = []
    for index, entry in enumerate(probes):
        if isinstance(entry, str):
            entries.append((index, {"name": entry}))
        elif (isinstance(entry, dict) and isinstance(entry.get("name"), str)
              and isinstance(entry.get("params", {}), dict)):
            entries.append((index, dict(entry)))
    return entries


def _merge_probe_params(probes: Any, overrides: dict[str, dict[str, Any]], flags: list[str], sources) -> Any:
    entries = _probe_entries(probes)
    names = [entry["name"] for _, entry in entries]
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise UserError(f"--probe-param names probe {unknown[0]!r}, which is not in this run ({', '.join(names)})")
    merged = list(probes)
    for index, entry in entries:
        if entry["name"] in overrides:
            entry["params"] = {**entry.get("params", {}), **overrides[entry["name"]]}
            merged[index] = entry
            for key in overrides[entry["name"]]:
                flag = next(f for f in reversed(flags) if f.partition("=")[0] == f"{entry['name']}.{key}")
                sources.record(("probes", index, "params", key), f"--probe-param {flag}")
    return merged


def _with_classifier_dir(probes: Any, classifier_dir: str, sources) -> Any:
    """--classifier-dir: the classifier_dir param of every probe that has one, unless set already."""
    from engine.probe import get_probe_class

    updated, used = list(probes) if isinstance(probes, list) else probes, False
    for index, entry in _probe_entries(probes):
        try:
            fields = get_probe_class(entry["name"]).params_class.model_fields
        except UserError as error:
            raise UserError(f"{sources.of(('probes', index))}: {error}") from None
        if "classifier_dir" in fields:
            if "classifier_dir" not in entry.get("params", {}):
                sources.record(("probes", index, "params", "classifier_dir"), "--classifier-dir")
            entry["params"] = {"classifier_dir": classifier_dir, **entry.get("params", {})}
            updated[index] = entry
            used = True
    if not used:
        raise UserError("--classifier-dir: no probe of this run uses latent classifiers")
    return updated


def execute_and_print(plan, cluster: Optional[str], ship_code: Optional[bool] = None, on_locked=None) -> None:
    """Run the plan and print what happened; exit 3 when rows failed (they are retried by a rerun)."""
    from engine.pipeline.failures import failures_path
    from engine.pipeline.run import execute
    from engine.report.summary import print_summary

    summary = execute(plan, cluster=cluster, ship_code=ship_code, on_locked=on_locked)
    failed = f", {summary.failed} failed ({failures_path(summary.output)})" if summary.failed else ""
    typer.echo(
        f"{summary.generated} rows generated, {summary.skipped} already done{failed}, "
        f"{summary.total_rows} in {summary.output} ({summary.seconds:.1f} s)"
    )
    if summary.total_rows:
        print_summary(summary.output)
    if summary.failed:
        rows = "row" if summary.failed == 1 else "rows"
        typer.echo(f"{summary.failed} {rows} failed; run the same command again to retry them", err=True)
        raise typer.Exit(code=3)


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
    check_output_folder(output, "--output")
    plan = plan_run(run_spec_from_dict(demo_spec(str(output), num_images, random_models), "demo"))
    execute_and_print(plan, None)
    content = build_report([output])
    typer.echo(f"\nreport: {content.output / 'report.html'} (and report.md beside it)")
