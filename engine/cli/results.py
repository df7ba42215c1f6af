"""Commands on finished runs: `engine score` (re-judge in place) and `engine report`."""

from __future__ import annotations

import math

import typer

from engine.cli.app import app, setup_logging, user_errors
from engine.cli.validation import check_output_folder
from engine.errors import UserError
from engine.specs.flags import parse_owner_key_values


@app.command()
@user_errors
def score(
    run_dir: str = typer.Argument(..., help="Run folder written by `engine run` (a path or a URI)."),
    judge: list[str] = typer.Option(..., "--judge", help="Judge NAME or NAME:PRESET (repeatable), e.g. clip."),
    judge_option: list[str] = typer.Option([], "--judge-option", help="JUDGE.KEY=VALUE judge option."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Images per judge call."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Add or replace scores of an existing run in place, without regenerating images."""
    from engine.scoring.registry import parse_judge_ref
    from engine.scoring.rescore import rescore_run

    setup_logging(verbose)
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda, got {device!r}")
    requests = [parse_judge_ref(ref) for ref in judge]
    options = parse_owner_key_values(judge_option, "--judge-option", "JUDGE")
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
    run_dirs: list[str] = typer.Argument(..., help="Run folders (paths or URIs); several are merged into one report."),
    output: str | None = typer.Option(None, "--output", help="Report folder (path or URI); default RUN_DIR/report."),
    max_images: int = typer.Option(12, "--max-images", min=1, help="Images per cell in the contact sheets."),
    worst_case_probe: list[str] = typer.Option(
        [], "--worst-case-probe", help="A probe of the recovery table's 'any probe' line (repeatable); default: "
        "the recovery probes acting on the erased model alone, controls and diffusion completion left out."),
    cells: list[str] = typer.Option(
        [], "--cells", help="Draw contact sheets only for these cells: KEY=PATTERN[,KEY=PATTERN...] with keys model, "
        "method, concept, target, probe, role and shell patterns (repeatable: any matches); `none` draws none."),
    embed_limit: float = typer.Option(
        25.0, "--embed-limit", min=0, help="MB of sheets report.html embeds as data URIs; past it they are "
        "separate files it links."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Recovery tables with 95% CIs, plots and image grids: report.md, report.html, summary.parquet/.csv."""
    from engine.probe import probe_entry
    from engine.report.build import SheetOptions, build_report
    from engine.report.cell_filter import parse_cell_filters

    setup_logging(verbose)
    for name in worst_case_probe:
        probe_entry(name)  # an unknown name stops here with the list of probes
    wanted = parse_cell_filters(cells)
    if not math.isfinite(embed_limit):
        raise UserError(f"--embed-limit must be a finite number of MB, got {embed_limit}")
    if output is not None:
        check_output_folder(output, "--output")
    sheets = SheetOptions(max_images=max_images, cells=wanted, embed_limit=int(embed_limit * 1024**2))
    content = build_report(run_dirs, output, max_images, worst_case_probe or None, sheets)
    report_file = f"{str(content.output).rstrip('/')}/report.html"
    typer.echo(f"report of {content.rows} rows in {len(content.cells)} cells: {report_file}")
