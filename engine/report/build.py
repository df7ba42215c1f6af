"""`engine report RUN_DIR [RUN_DIR...]`: recovery tables with confidence intervals, plots, image grids.

Reads the rows of one or more runs (merged; a row present in several runs counts once) and writes:
- summary.parquet / summary.csv: one line per cell = (model, method, concept, target_concept,
  probe, params): n, CLIP mean with a 95% Student-t interval, top-1 / top-5 rates with 95% Wilson
  intervals, mean target probability, and for best-of-N probes the all-candidates means;
- paper_table.csv: probes x methods, each value the mean over concepts of the cells' values (the
  original's notebook averaging), the base model (method `none`) included;
- plots/*.png: recovery by probe for each method, pooled over concepts, with 95% CI error bars;
- sheets/*.png: a contact sheet per cell with prompt, seed and scores under each image;
- report.md and a self-contained report.html (every image embedded as a data URI).
Numbers from different judges are not comparable, so rows scored by different judge models
are refused (rescore them with `engine score`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from engine.errors import UserError
from engine.report.figures import write_contact_sheets, write_recovery_plots
from engine.report.render import write_html, write_markdown
from engine.report.tables import ReportContent, cell_stats, load_rows, paper_table, pooled_stats, present_values
from engine.results import now_iso

logger = logging.getLogger(__name__)


def default_report_dir(run_dirs: list[Path], output: Path | None) -> Path:
    if output is not None:
        return Path(output)
    if len(run_dirs) > 1:
        raise UserError("several run folders are merged into one report: give --output DIR")
    return Path(run_dirs[0]) / "report"


def build_report(run_dirs: list[Path], output: Path | None = None, max_images_per_cell: int = 12) -> ReportContent:
    """Read the runs, aggregate, and write every report file. Raises UserError on bad input."""
    if not run_dirs:
        raise UserError("give at least one run folder")
    run_dirs = [Path(d) for d in run_dirs]
    report_dir = default_report_dir(run_dirs, output)
    frame = load_rows(run_dirs)
    cells = cell_stats(frame)
    judges = sorted({str(v) for c in ("clip_model", "judge_model") for v in present_values(frame[c])})
    content = ReportContent(
        output=report_dir,
        runs=[str(d) for d in run_dirs],
        created_at=now_iso(),
        rows=len(frame),
        judges=judges,
        cells=cells,
        paper=paper_table(cells),
    )
    report_dir.mkdir(parents=True, exist_ok=True)
    cells.to_parquet(report_dir / "summary.parquet", index=False)
    cells.to_csv(report_dir / "summary.csv", index=False)
    content.paper.to_csv(report_dir / "paper_table.csv", index=False)
    content.plots = write_recovery_plots(pooled_stats(frame), report_dir / "plots")
    content.sheets = write_contact_sheets(run_dirs, frame, cells, report_dir / "sheets", max_images_per_cell)
    write_markdown(content, report_dir / "report.md")
    write_html(content, report_dir / "report.html")
    logger.info("report of %d rows in %d cells written to %s", len(frame), len(cells), report_dir)
    return content
