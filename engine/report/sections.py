"""The report as one list of sections, shared by the HTML and Markdown templates.

Each section has a title, an optional note, an optional table of display strings and optional
images; the renderers only lay them out. Numbers are formatted here, once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from engine.metrics.columns import METRIC_BY_COLUMN, METRICS
from engine.report.paper import wide
from engine.report.tables import ReportContent, method_label
from engine.report.worst_case import ANY_PROBE, with_worst_case
from engine.report.worst_case import NOTE as WORST_CASE_NOTE

STATISTICS_NOTE = (
    "Each cell is one (model, concept, target concept, probe, params). CLIP = mean of 100 x cosine "
    "with a 95% Student-t interval (n - 1 degrees of freedom); top-1 / top-5 = share of images whose "
    "judge's top-1 / top-5 classes include one of the concept's exact classes, with a 95% Wilson "
    "interval. Styles have no classes: their rates are empty, not 0. 'All candidates' values give the "
    "mean over every candidate a best-of-N probe generated, next to the value of the candidate its "
    "selector kept."
)
RECOVERY_NOTE = (
    "Each erased model probed on the concepts it erased, pooled over those concepts (rates in %, 95% "
    "interval). The base model's column is the same probe on the same concepts without erasure."
)
PRESERVATION_NOTE = (
    "Erased models on concepts they did not erase (interference, standard prompt), next to the base "
    "model on the same prompts and seeds; ratio = erased / base (1 = nothing lost)."
)
MIXED_NOTE = (
    "These models declare no erased concepts, so each value averages a probe-method's cells over all "
    "concepts: erased and kept concepts are mixed. Declare `erased:` on the models to get recovery "
    "and preservation tables."
)
SELECTION_NOTE = (
    "* selection-inflated: the best-of-N candidate was chosen by the same model that judges this "
    "column; compare with the all-candidates value beside it."
)


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]


@dataclass
class Section:
    title: str
    level: int = 2
    note: str | None = None
    table: Table | None = None
    images: list[tuple[str, Path]] = field(default_factory=list)


def missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def fmt_number(value: Any, digits: int = 2) -> str:
    return "–" if missing(value) else f"{float(value):.{digits}f}"


def fmt_interval(value: Any, low: Any, high: Any, scale: float = 1.0, digits: int = 2) -> str:
    if missing(value):
        return "–"
    text = f"{float(value) * scale:.{digits}f}"
    if not missing(low) and not missing(high):
        text += f" [{float(low) * scale:.{digits}f}, {float(high) * scale:.{digits}f}]"
    return text


def _fmt_triple(triple: Any, digits: int) -> str:
    """(value, low, high[, "inflated"]) -> "v [low, high]", marked * when selection-inflated."""
    if not isinstance(triple, tuple):
        return "–"
    text = fmt_interval(*triple[:3], digits=digits)
    return text + " *" if len(triple) > 3 and text != "–" else text


def _scales() -> dict[str, float]:
    return {m.column: m.scale for m in METRICS}


def recovery_section(recovery: pd.DataFrame, title: str, index: list[str]) -> Section:
    table = wide(recovery, index, _scales())
    methods = [c for c in table.columns if c not in index]
    headers = [*("probe" if c == "probe_label" else c for c in index), *(method_label(m) for m in methods)]
    rows = []
    for _, line in table.iterrows():
        digits = METRIC_BY_COLUMN[_column_of(recovery, line["metric"])].digits
        rows.append([str(line[c]) for c in index] + [_fmt_triple(line[m], digits) for m in methods])
    inflated = "inflated" in recovery and bool(recovery["inflated"].fillna(False).astype(bool).any())
    note = RECOVERY_NOTE + (" " + SELECTION_NOTE if inflated else "")
    note += " " + WORST_CASE_NOTE if (recovery["probe_label"] == ANY_PROBE).any() else ""
    return Section(title, note=note, table=Table(headers, rows))


def _column_of(table: pd.DataFrame, label: str) -> str:
    return str(table.loc[table["metric"] == label, "metric_column"].iloc[0])


def preservation_section(preservation: pd.DataFrame, title: str, by_concept: bool) -> Section:
    headers = ["method", "probe", *(["concept"] if by_concept else []), "metric", "n", "erased model",
               "base model, same prompts", "ratio to base"]
    rows = []
    for _, line in preservation.iterrows():
        metric = METRIC_BY_COLUMN[line["metric_column"]]
        rows.append([
            line["method"], line["probe_label"], *([line["target_concept"]] if by_concept else []), line["metric"],
            str(int(line["n"])),
            fmt_interval(line["value"], line["ci_low"], line["ci_high"], metric.scale, metric.digits),
            fmt_interval(line["base_value"], line["base_ci_low"], line["base_ci_high"], metric.scale, metric.digits),
            fmt_number(line["ratio_to_base"], 2),
        ])  # fmt: skip
    return Section(title, note=PRESERVATION_NOTE, table=Table(headers, rows))


def mean_over_concepts_section(table: pd.DataFrame) -> Section:
    methods = [c for c in table.columns if c not in ("probe", "metric")]
    headers = ["probe", "metric", *(method_label(m) for m in methods)]
    rows = [[r["probe"], r["metric"], *(fmt_number(r[m], 2 if r["metric"].startswith("CLIP") else 1) for m in methods)]
            for _, r in table.iterrows()]
    return Section("Probes x methods (mean over concepts)", note=MIXED_NOTE, table=Table(headers, rows))


def cell_section(cells: pd.DataFrame, inflated: dict[int, set[str]]) -> Section:
    with_targets = bool((cells["target_concept"] != cells["concept"]).any())
    with_candidates = bool(cells["candidate_n"].notna().any())
    shown = [m for m in METRICS if cells[m.value].notna().any() or m.kind == "rate"]
    headers = ["model", "method", "concept", *(["target"] if with_targets else []), "probe", "n",
               *(f"{m.label} [95% CI]" for m in shown)]
    candidate_metrics = [m for m in METRICS if m.candidate_column]
    if with_candidates:
        headers += ["candidates", *(f"{m.label}, all cand." for m in candidate_metrics), "selector"]
    rows = []
    for position, (_, c) in enumerate(cells.iterrows()):
        marks = inflated.get(position, set())
        row = [c["model"], c["method"], c["concept"], *([c["target_concept"]] if with_targets else []),
               c["probe_label"], str(int(c["n"]))]
        for m in shown:
            text = fmt_interval(c[m.value], c[m.ci_low], c[m.ci_high], m.scale, m.digits)
            row.append(text + (" *" if m.column in marks and text != "–" else ""))
        if with_candidates:
            row += ["–" if missing(c["candidate_n"]) else str(int(c["candidate_n"])),
                    *(fmt_interval(c[m.candidate_column], None, None, m.scale, m.digits) for m in candidate_metrics),
                    "–" if missing(c["selector"]) else str(c["selector"])]
        rows.append(row)
    note = SELECTION_NOTE if any(inflated.values()) else None
    return Section("Per cell", note=note, table=Table(headers, rows))


def sheet_title(cell: dict[str, Any]) -> str:
    target = f" -> {cell['target_concept']}" if cell["target_concept"] != cell["concept"] else ""
    return f"{cell['model']} ({cell['method']}) / {cell['concept']}{target} / {cell['probe_label']}"


def report_sections(content: ReportContent) -> list[Section]:
    from engine.report.paper import (
        has_roles,
        mean_over_concepts_table,
        preservation_table,
        recovery_table,
    )

    frame = content.frame
    sections: list[Section] = []
    if has_roles(frame):
        recovery = with_worst_case(recovery_table(frame), frame, content.worst_case_probes)
        if not recovery.empty:
            sections.append(recovery_section(recovery, "Recovery: does the erased concept come back?",
                                             ["probe_label", "metric"]))
        preservation = preservation_table(frame)
        if not preservation.empty:
            sections.append(preservation_section(preservation, "Preservation: what did erasure break?", False))
        by_concept = recovery_table(frame, by_concept=True)
        if not by_concept.empty:
            sections.append(recovery_section(by_concept, "Recovery per concept", ["concept", "probe_label", "metric"]))
            sections[-1].level = 3
        kept_by_concept = preservation_table(frame, by_concept=True)
        if not kept_by_concept.empty:
            sections.append(preservation_section(kept_by_concept, "Preservation per concept", True))
            sections[-1].level = 3
    mixed = mean_over_concepts_table(content.cells)
    if len(mixed):
        sections.append(mean_over_concepts_section(mixed))
    sections.append(cell_section(content.cells, content.inflated))
    if content.plots:
        sections.append(Section("Plots", images=list(content.plots)))
    if content.paired_sheets:
        sections.append(Section("Paired images: base model and each method on the same prompt and seed",
                                images=list(content.paired_sheets)))
    sections.append(Section("Images per cell"))
    sections += [Section(sheet_title(cell), level=3, images=[(sheet_title(cell), path)])
                 for cell, path in content.sheets]
    return sections
