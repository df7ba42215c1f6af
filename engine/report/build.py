"""`engine report RUN_DIR [RUN_DIR...]`: recovery and preservation tables with confidence intervals,
plots, image grids.

Reads the rows of one or more runs (merged; a row present in several runs counts once) and writes:
- summary.parquet / summary.csv: one line per cell = (model, method, concept, target_concept,
  probe, params): n, each metric with its 95% interval, and for best-of-N probes the
  all-candidates means;
- recovery.csv / preservation.csv (runs whose models declare erased concepts): the paper's tables
  in long form, each value with n and its interval;
- paper_table.csv: the recovery table with methods as columns (base model first); for runs without
  erased concepts, each probe x method averaged over concepts instead;
- plots/*.png: bar charts by probe and method with 95% CI error bars;
- sheets/*.png: a contact sheet per cell, and paired sheets (base and each method on the same seed);
- report.md and report.html: the summary tables first, then plots and sheets. The HTML is
  self-contained (every image a data URI) while the sheets' PNGs total at most `embed_limit` bytes;
  past it the sheets stay separate files beside it, paired sheets shown from their files and the
  cell sheets as a list of links, so a grid's report opens at once.

Memory: the score columns of every row (no image column, `load_rows`) plus the images of the row
groups holding one sheet's rows and a 256 MB cache of recent row groups (engine.report.images).
`cells` (a `--cells` filter, engine.report.cell_filter) chooses which cells get a contact sheet.
Numbers from different judges are not comparable, so rows scored by different judge models
are refused (rescore them with `engine score`).

Run folders and the report folder may be local paths or URIs (s3://...): a report for an object
store is built in a local temporary folder and then uploaded file by file.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from engine.errors import UserError
from engine.metrics.columns import METRICS, MODEL_COLUMNS
from engine.probe import BASE, RECOVERY, preservation_probes
from engine.report.cell_filter import CellFilter
from engine.report.figures import write_contact_sheets, write_recovery_plots
from engine.report.images import ImageIndex
from engine.report.paired import write_paired_sheets
from engine.report.paper import has_roles, mean_over_concepts_table, preservation_table, recovery_table
from engine.report.render import write_html, write_markdown
from engine.report.sections import report_sections
from engine.report.selection import selection_inflated
from engine.report.tables import (
    ReportContent,
    cell_stats,
    load_failures,
    load_rows,
    pooled_stats,
    present_values,
)
from engine.report.worst_case import with_worst_case
from engine.results import now_iso
from engine.storage import OutputLocation, output_location

logger = logging.getLogger(__name__)


RunDir = str | Path


def default_report_dir(run_dirs: Sequence[RunDir], output: RunDir | None) -> Path | OutputLocation:
    """A local folder (Path) or a remote one (OutputLocation)."""
    if output is None and len(run_dirs) > 1:
        raise UserError("several run folders are merged into one report: give --output DIR")
    target = output_location(output) if output is not None else output_location(run_dirs[0]).child("report")
    if not target.is_local:
        return target
    return Path(output) if output is not None else target.local_path()


CSV_SUFFIXES = ("", " low", " high", " n", " interval note", " failed", " inflated")


def recovery_wide(recovery: pd.DataFrame) -> pd.DataFrame:
    """paper_table.csv of a paired run: probe, metric (best-of-N probes: one line per reading), then one
    column per method (value in display units: rates in %), with `<method> low` / `high` (interval),
    `n` (prompts, or `k concepts x prompts`), `interval note` (why none), `failed` (rows that failed)
    and `inflated` (picked by the judging model) beside each."""
    from engine.report.tables import method_order

    scale = {m.column: m.scale for m in METRICS}
    methods = method_order(recovery["method"])
    records = []
    for (probe, metric), group in recovery.groupby(["probe_label", "metric"], sort=False):
        record = {"probe": probe, "metric": metric}
        for _, line in group.iterrows():
            factor = scale[line["metric_column"]]
            for suffix, column in (("", "value"), (" low", "ci_low"), (" high", "ci_high")):
                value = line[column]
                record[line["method"] + suffix] = None if pd.isna(value) else value * factor
            record[line["method"] + " n"] = line["n_label"]
            record[line["method"] + " interval note"] = None if pd.isna(line["ci_note"]) else line["ci_note"]
            record[line["method"] + " failed"] = int(line["failed"])
            record[line["method"] + " inflated"] = bool(line["inflated"])
        records.append(record)
    columns = ["probe", "metric", *[m + s for m in methods for s in CSV_SUFFIXES]]
    return pd.DataFrame.from_records(records, columns=columns)


def inflated_cells(cells: pd.DataFrame) -> dict[int, set[str]]:
    """Per cell position, the score columns its best-of-N selector picked with the judging model."""
    marks = {}
    for position, (_, cell) in enumerate(cells.iterrows()):
        values = [None if pd.isna(cell[c]) else str(cell[c]) for c in ("selector", "judge_model", "clip_model")]
        columns = selection_inflated(*values)
        if columns:
            marks[position] = columns
    return marks


EMBED_LIMIT = 25 * 1024**2  # bytes of sheet PNGs a report.html embeds; past it they are linked files


@dataclasses.dataclass(frozen=True)
class SheetOptions:
    """What the report draws of the images: `max_images` per cell sheet, the cells that get one
    (`--cells`), and how many bytes of sheets report.html embeds before it links them instead."""

    max_images: int = 12
    cells: CellFilter = dataclasses.field(default=lambda cell: True)
    embed_limit: int = EMBED_LIMIT


def build_report(
    run_dirs: Sequence[RunDir], output: RunDir | None = None, max_images_per_cell: int = 12,
    worst_case_probes: list[str] | None = None, sheets: SheetOptions | None = None,
) -> ReportContent:
    """Read the runs, aggregate, and write every report file. Raises UserError on bad input.
    `worst_case_probes`: the probes of the recovery table's "any probe" line (None: the default).
    `sheets` overrides `max_images_per_cell` when given."""
    if not run_dirs:
        raise UserError("give at least one run folder")
    options = sheets or SheetOptions(max_images=max_images_per_cell)
    target = default_report_dir(run_dirs, output)
    if isinstance(target, Path):
        return _build(run_dirs, target, options, worst_case_probes)
    with tempfile.TemporaryDirectory(prefix="engine-report-") as staging:
        content = _build(run_dirs, Path(staging), options, worst_case_probes)
        uploaded = {path: _upload(Path(staging), path, target) for path in sorted(Path(staging).rglob("*"))
                    if path.is_file()}
    return dataclasses.replace(
        # _build wrote local files: every path is a Path (Path() only tells the checker so).
        content, output=target.uri, plots=[(title, uploaded[Path(path)]) for title, path in content.plots],
        sheets=[(cell, uploaded[Path(path)]) for cell, path in content.sheets],
        paired_sheets=[(title, uploaded[Path(path)]) for title, path in content.paired_sheets],
    )


def _upload(staging: Path, path: Path, target: OutputLocation) -> str:
    parts = path.relative_to(staging).parts
    target.atomic_write(path.read_bytes(), *parts)
    return target.display(*parts)


def _build(run_dirs: Sequence[RunDir], report_dir: Path, options: SheetOptions,
           worst_case_probes: list[str] | None = None) -> ReportContent:
    frame = load_rows(run_dirs)
    failures = load_failures(run_dirs, frame)
    cells = cell_stats(frame, failures)
    judges = sorted({str(v) for c in MODEL_COLUMNS.values() for v in present_values(frame[c])})
    paired = has_roles(frame)
    report_dir.mkdir(parents=True, exist_ok=True)
    if paired:
        recovery = with_worst_case(recovery_table(frame, failures=failures), frame, worst_case_probes)
        recovery.to_csv(report_dir / "recovery.csv", index=False)
        preservation_table(frame, failures=failures).to_csv(report_dir / "preservation.csv", index=False)
        paper = recovery_wide(recovery)
    else:
        paper = mean_over_concepts_table(cells)
    content = ReportContent(
        output=report_dir,
        runs=[str(d) for d in run_dirs],
        created_at=now_iso(),
        rows=len(frame),
        judges=judges,
        frame=frame,
        cells=cells,
        failures=failures,
        paper=paper,
        worst_case_probes=worst_case_probes,
    )
    cells.to_parquet(report_dir / "summary.parquet", index=False)
    cells.to_csv(report_dir / "summary.csv", index=False)
    paper.to_csv(report_dir / "paper_table.csv", index=False)
    if paired:  # plots show recovery: erased concepts, and the base model on the same concepts
        erased = set(frame.loc[frame["role"] == RECOVERY, "concept"])
        plotted = frame[((frame["role"] == RECOVERY) | ((frame["role"] == BASE) & frame["concept"].isin(erased)))
                        & ~frame["probe"].isin(preservation_probes(frame["probe"]))]
        content.plots = write_recovery_plots(pooled_stats(plotted), report_dir / "plots", "erased concepts")
    else:
        content.plots = write_recovery_plots(pooled_stats(frame), report_dir / "plots", "pooled over concepts")
    content.inflated = inflated_cells(cells)
    index = ImageIndex(run_dirs)
    content.sheets = write_contact_sheets(index, frame, cells, report_dir / "sheets", options.max_images, options.cells)
    content.paired_sheets = write_paired_sheets(index, frame, report_dir / "sheets", options.max_images)
    sheet_bytes = sum(Path(path).stat().st_size for _, path in [*content.sheets, *content.paired_sheets])
    content.embed_sheets = sheet_bytes <= options.embed_limit
    if not content.embed_sheets:
        logger.info("sheets total %.0f MB, over the %.0f MB embedding limit: report.html links them",
                    sheet_bytes / 1e6, options.embed_limit / 1e6)
    sections = report_sections(content)
    write_markdown(content, report_dir / "report.md", sections)
    write_html(content, report_dir / "report.html", sections)
    logger.info("report of %d rows in %d cells written to %s", len(frame), len(cells), report_dir)
    return content
