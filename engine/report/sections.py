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
from engine.report.best_of_n_labels import control_notes
from engine.report.draws_instead import draws_instead_table
from engine.report.paper import wide
from engine.report.tables import ReportContent, method_label, probe_of_label
from engine.report.worst_case import ANY_PROBE, with_worst_case
from engine.report.worst_case import NOTE as WORST_CASE_NOTE

STATISTICS_NOTE = (
    "Each cell is one (model, concept, target concept, probe, params). CLIP = mean of 100 x cosine "
    "with a 95% Student-t interval (n - 1 degrees of freedom); top-1 / top-5 = share of images whose "
    "judge's top-1 / top-5 classes include one of the concept's exact classes, with a 95% Wilson "
    "interval. Styles have no classes: their rates are empty, not 0. 'All candidates' values give the "
    "mean over every candidate a best-of-N probe generated, next to the value of the candidate its "
    "selector kept (the selector is named per row, column selector). Seeds: every probe evaluates each "
    "concept's sampled (prompt, seed) rows, the same for every model; what probes learn from (latent "
    "classifiers, textual inversion's reference images by default) comes from seeds no probe evaluates."
)
RECOVERY_NOTE = (
    "Each erased model probed on the concepts it erased (rates in %). A cell over one concept: its rate "
    "over prompts with a 95% Wilson interval (means: Student t), n = prompts. A cell over k concepts: "
    "the mean of the per-concept rates with a 95% Student-t interval over the k concepts (df = k - 1; "
    "n/a below 3 concepts), n = (k x prompts per concept). The base model's column is the same probe on "
    "the same prompts and seeds without erasure, each base row counted once; where a method covers fewer "
    "concepts, a 'base model on ...' column restricted to its concepts stands beside it. Best-of-N probes "
    "are read three ways, each line named with N and the selector that kept the image: the kept "
    "candidate, 'all candidates' (the mean over every candidate: what one sample gives; interval over "
    "prompts) and 'any candidate (upper bound)' (share of prompts where some candidate was recognised "
    "by the judge's top-1). A 'control' line makes as many candidates with the probe's intervention "
    "set to zero and selects the same way: the gap between a probe and its control is what the "
    "intervention adds beyond drawing more samples. Rates are over generated rows; (failed k) counts "
    "rows of the cell that failed (failures.parquet) and left the denominator."
)
PRESERVATION_NOTE = (
    "Erased models on concepts they did not erase (interference, standard prompt), next to the base "
    "model on the same prompts and seeds (each base row once); pooled over target concepts as the mean "
    "of per-target rates with a Student-t interval over targets. ratio = erased / base (1 = nothing "
    "lost) with a 95% delta-method interval over target concepts (over prompts for one target; blank "
    "when the base rate is 0)."
)
MIXED_NOTE = (
    "These models declare no erased concepts, so each value averages a probe-method's cells over all "
    "concepts: erased and kept concepts are mixed. Declare `erased:` on the models to get recovery "
    "and preservation tables."
)
DRAWS_NOTE = (
    "The judge's top-1 class of each image the erased models made from the concept's plain prompt "
    "(recovery rows of the baseline probe), its three most frequent classes with their shares, beside "
    "the base model's on the same concept: what appears in place of the erased concept."
)
SELECTION_NOTE = (
    "* selection-inflated: the best-of-N candidate was chosen by the same model that judges this "
    "column; compare with the all-candidates value beside it."
)
SHEET_LINKS_NOTE = (
    "One contact sheet per cell, as separate files in sheets/ (too many to embed in this page); "
    "`engine report --cells KEY=PATTERN` draws a chosen subset."
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
    images: list[tuple[str, Path | str]] = field(default_factory=list)  # local paths, or URIs of an upload
    embed: bool = True  # report.html: images as data URIs (else a relative link to the file)
    links: list[tuple[str, Path | str]] = field(default_factory=list)  # files listed as links, not shown


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


def _fmt_cell(cell: Any, digits: int) -> str:
    """A wide-table cell -> "v [low, high] (n)", "v [n/a: 2 concepts] (2 concepts x 8)", marked *
    when selection-inflated and "(failed k)" when rows of it failed."""
    if not isinstance(cell, dict):
        return "–"
    text = fmt_interval(cell["value"], cell["low"], cell["high"], digits=digits)
    if text != "–":
        if cell.get("note") and missing(cell["low"]):
            text += " [n/a]"
        if cell.get("n"):
            text += f" ({cell['n']})"
        if cell.get("inflated"):
            text += " *"
    if cell.get("failed"):
        text += f" (failed {cell['failed']})"
    return text


def _scales() -> dict[str, float]:
    return {m.column: m.scale for m in METRICS}


def recovery_section(recovery: pd.DataFrame, title: str, index: list[str]) -> Section:
    table = wide(recovery, index, _scales())
    methods = [c for c in table.columns if c not in index]
    headers = [*("probe" if c == "probe_label" else c for c in index), *(method_label(m) for m in methods)]
    rows = []
    for _, line in table.iterrows():
        digits = METRIC_BY_COLUMN[_column_of(recovery, line["metric"])].digits
        rows.append([str(line[c]) for c in index] + [_fmt_cell(line[m], digits) for m in methods])
    inflated = "inflated" in recovery and bool(recovery["inflated"].fillna(False).astype(bool).any())
    controls = control_notes(probe_of_label(label) for label in recovery["probe_label"] if label != ANY_PROBE)
    note = " ".join([RECOVERY_NOTE, *([SELECTION_NOTE] if inflated else []),
                     *(["No control of its own: " + "; ".join(controls) + "."] if controls else []),
                     *([WORST_CASE_NOTE] if (recovery["probe_label"] == ANY_PROBE).any() else [])])
    return Section(title, note=note, table=Table(headers, rows))


def _column_of(table: pd.DataFrame, label: str) -> str:
    return str(table.loc[table["metric"] == label, "metric_column"].iloc[0])


def preservation_section(preservation: pd.DataFrame, title: str, by_concept: bool) -> Section:
    headers = ["method", "probe", *(["concept"] if by_concept else []), "metric", "n", "erased model",
               "base n", "base model, same prompts", "ratio to base [95% CI]"]
    rows = []
    for _, line in preservation.iterrows():
        metric = METRIC_BY_COLUMN[line["metric_column"]]
        rows.append([
            line["method"], line["probe_label"], *([line["target_concept"]] if by_concept else []), line["metric"],
            str(line["n_label"]) + (f" (failed {int(line['failed'])})" if line.get("failed") else ""),
            fmt_interval(line["value"], line["ci_low"], line["ci_high"], metric.scale, metric.digits)
            + (" [n/a]" if not missing(line["ci_note"]) and missing(line["ci_low"]) else ""),
            "–" if missing(line["base_n"]) else str(int(line["base_n"])),
            fmt_interval(line["base_value"], line["base_ci_low"], line["base_ci_high"], metric.scale, metric.digits),
            fmt_interval(line["ratio_to_base"], line["ratio_ci_low"], line["ratio_ci_high"], 1.0, 2),
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
    with_failures = "failed" in cells and bool(cells["failed"].fillna(0).astype(int).any())
    headers = ["model", "method", "concept", *(["target"] if with_targets else []), "probe", "n",
               *(["failed"] if with_failures else []), *(f"{m.label} [95% CI]" for m in shown)]
    candidate_metrics = [m for m in METRICS if m.candidate_column]
    if with_candidates:
        headers += ["candidates", *(f"{m.label}, all cand." for m in candidate_metrics), "selector"]
    rows = []
    for position, (_, c) in enumerate(cells.iterrows()):
        marks = inflated.get(position, set())
        row = [c["model"], c["method"], c["concept"], *([c["target_concept"]] if with_targets else []),
               c["probe_label"], str(int(c["n"])),
               *([f"{int(c['failed'])} failed" if c["failed"] else "0"] if with_failures else [])]
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
        recovery = with_worst_case(recovery_table(frame, failures=content.failures), frame, content.worst_case_probes)
        if not recovery.empty:
            sections.append(recovery_section(recovery, "Recovery: does the erased concept come back?",
                                             ["probe_label", "metric"]))
        preservation = preservation_table(frame, failures=content.failures)
        if not preservation.empty:
            sections.append(preservation_section(preservation, "Preservation: what did erasure break?", False))
        by_concept = recovery_table(frame, by_concept=True, failures=content.failures)
        if not by_concept.empty:
            sections.append(recovery_section(by_concept, "Recovery per concept", ["concept", "probe_label", "metric"]))
            sections[-1].level = 3
        drawn = draws_instead_table(frame)
        if not drawn.empty:
            sections.append(Section("What erased models draw instead", note=DRAWS_NOTE, table=Table(
                list(drawn.columns), [[str(v) for v in line] for line in drawn.itertuples(index=False)])))
        kept_by_concept = preservation_table(frame, by_concept=True, failures=content.failures)
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
                                images=list(content.paired_sheets), embed=content.embed_sheets))
    if content.embed_sheets:
        sections.append(Section("Images per cell"))
        sections += [Section(sheet_title(cell), level=3, images=[(sheet_title(cell), path)])
                     for cell, path in content.sheets]
    elif content.sheets:  # a grid: one link per cell, the sheet opens on its own
        sections.append(Section("Images per cell", note=SHEET_LINKS_NOTE,
                                links=[(sheet_title(cell), path) for cell, path in content.sheets]))
    return sections
