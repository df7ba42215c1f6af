"""What a finished run prints on the terminal (the full report is `engine report`): the recovery and
preservation tables when the run's models declare erased concepts, else one line per cell."""

from __future__ import annotations

import pandas as pd
import typer

from engine.metrics.columns import METRICS
from engine.report.paper import has_roles, preservation_table, recovery_table
from engine.report.sections import Table, fmt_interval, fmt_number, preservation_section, recovery_section
from engine.report.tables import cell_stats, load_failures, load_rows, present_metrics
from engine.report.worst_case import with_worst_case
from engine.results import Output


def summary_frame(output: Output) -> pd.DataFrame:
    """One line per (model, concept, probe) cell: n, seconds per image, each judged metric with its 95% CI."""
    # A resumed run may mix judges; the terminal summary still shows it (`engine report` refuses).
    frame = load_rows([output], single_judge=False)
    cells = cell_stats(frame)
    columns = {
        "model": cells["model"],
        "concept": cells["concept"],
        "probe": cells["probe_label"],
        "n": cells["n"],
        "s/image": [fmt_number(v) for v in cells["seconds_per_image"]],
    }
    for metric in [m for m in present_metrics(frame) if m.plotted] or [m for m in METRICS if m.plotted][:2]:
        columns[f"{metric.label} [95% CI]"] = [
            fmt_interval(v, lo, hi, metric.scale, metric.digits)
            for v, lo, hi in zip(cells[metric.value], cells[metric.ci_low], cells[metric.ci_high], strict=False)
        ]
    return pd.DataFrame(columns)


def paper_summary(output: Output) -> str | None:
    """The recovery table (and the preservation table, if any) as text; None for unpaired runs."""
    frame = load_rows([output], single_judge=False)
    if not has_roles(frame):
        return None
    failures = load_failures([output], frame)
    parts = [f"{len(failures)} row(s) failed and are left out of every rate (failures.parquet)"] if len(
        failures) else []
    recovery = with_worst_case(recovery_table(frame, failures=failures), frame)
    if not recovery.empty:
        title = "Recovery (erased concepts; rates in %, 95% CI)"
        section = recovery_section(recovery, title, ["probe_label", "metric"])
        parts += [section.title, _text(section.table)]
    preservation = preservation_table(frame, failures=failures)
    if not preservation.empty:
        section = preservation_section(preservation, "Preservation (other concepts, vs the base model)", False)
        parts += ["", section.title, _text(section.table)]
    return "\n".join(parts)


def _text(table: Table | None) -> str:
    assert table is not None  # recovery and preservation sections always hold a table
    return pd.DataFrame(table.rows, columns=table.headers).to_string(index=False)


def print_summary(output: Output) -> None:
    typer.echo("")
    typer.echo(paper_summary(output) or summary_frame(output).to_string(index=False))
