"""Render a report as Markdown (images linked as files) and as one self-contained HTML file
(images embedded as base64 data URIs, inline CSS, no external reference)."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import Any

import pandas as pd

from engine.report.tables import ReportContent, method_label

STATISTICS_NOTE = (
    "Each cell is one (model, concept, target concept, probe, params). CLIP = mean of 100 x cosine "
    "with a 95% Student-t interval (n - 1 degrees of freedom); top-1 / top-5 = share of images whose "
    "judge's top-1 / top-5 classes include one of the concept's exact classes, with a 95% Wilson "
    "interval. Styles have no classes: their rates are empty, not 0. The comparison table averages "
    "each probe-method's cell values over concepts (every concept weighs the same); plots pool all "
    "images of a probe-method. 'All candidates' rows give the mean over every candidate a best-of-N "
    "probe generated, next to the rate of the candidate its selector kept."
)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def fmt_number(value: Any, digits: int = 2) -> str:
    return "–" if _missing(value) else f"{float(value):.{digits}f}"


def fmt_interval(value: Any, low: Any, high: Any, scale: float = 1.0, digits: int = 2) -> str:
    if _missing(value):
        return "–"
    text = f"{float(value) * scale:.{digits}f}"
    if not _missing(low) and not _missing(high):
        text += f" [{float(low) * scale:.{digits}f}, {float(high) * scale:.{digits}f}]"
    return text


def paper_rows(paper: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    methods = [c for c in paper.columns if c not in ("probe", "metric")]
    headers = ["probe", "metric", *[method_label(m) for m in methods]]
    rows = [
        [r["probe"], r["metric"], *[fmt_number(r[m], 2 if r["metric"].startswith("CLIP") else 1) for m in methods]]
        for _, r in paper.iterrows()
    ]
    return headers, rows


def cell_rows(cells: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    with_targets = bool((cells["target_concept"] != cells["concept"]).any())
    with_candidates = bool(cells["candidate_n"].notna().any())
    headers = ["model", "method", "concept", *(["target"] if with_targets else []), "probe", "n",
               "CLIP [95% CI]", "top-1 % [95% CI]", "top-5 % [95% CI]", "target prob."]
    if with_candidates:
        headers += ["candidates", "CLIP, all cand.", "top-1 %, all cand.", "top-5 %, all cand.", "selector"]
    rows = []
    for _, c in cells.iterrows():
        row = [c["model"], c["method"], c["concept"], *([c["target_concept"]] if with_targets else []),
               c["probe_label"], str(int(c["n"])),
               fmt_interval(c["clip_mean"], c["clip_ci_low"], c["clip_ci_high"]),
               fmt_interval(c["top1_rate"], c["top1_ci_low"], c["top1_ci_high"], 100.0, 1),
               fmt_interval(c["top5_rate"], c["top5_ci_low"], c["top5_ci_high"], 100.0, 1),
               fmt_number(c["target_prob_mean"], 3)]
        if with_candidates:
            row += ["–" if _missing(c["candidate_n"]) else str(int(c["candidate_n"])),
                    fmt_number(c["candidate_clip_mean"]),
                    fmt_interval(c["candidate_top1_rate"], None, None, 100.0, 1),
                    fmt_interval(c["candidate_top5_rate"], None, None, 100.0, 1),
                    c["selector"] or "–"]
        rows.append(row)
    return headers, rows  # fmt: skip


def sheet_title(cell: dict[str, Any]) -> str:
    target = f" -> {cell['target_concept']}" if cell["target_concept"] != cell["concept"] else ""
    return f"{cell['model']} ({cell['method']}) / {cell['concept']}{target} / {cell['probe_label']}"


# --------------------------------------------------------------------------- Markdown


def _markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(headers), line(["---"] * len(headers)), *[line(r) for r in rows]])


def render_markdown(content: ReportContent) -> str:
    parts = [
        "# Erasure probe report",
        f"Created {content.created_at} from {content.rows} rows of: " + ", ".join(f"`{r}`" for r in content.runs),
        f"Judges: {', '.join(f'`{j}`' for j in content.judges) or 'none (unscored rows)'}",
        STATISTICS_NOTE,
        "## Probes x methods (mean over concepts)",
        _markdown_table(*paper_rows(content.paper)),
        "## Per cell",
        _markdown_table(*cell_rows(content.cells)),
        "## Plots",
        *[f"![{title}]({path.relative_to(content.output).as_posix()})" for title, path in content.plots],
        "## Images",
    ]
    for cell, path in content.sheets:
        parts += [f"### {sheet_title(cell)}", f"![{sheet_title(cell)}]({path.relative_to(content.output).as_posix()})"]
    return "\n\n".join(parts) + "\n"


def write_markdown(content: ReportContent, path: Path) -> None:
    path.write_text(render_markdown(content))


# --------------------------------------------------------------------------- HTML

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: right; }
th { background: #f2f2f2; }
td:nth-child(-n+4) { text-align: left; }
img { max-width: 100%; border: 1px solid #ddd; }
figure { margin: 1em 0; }
p.note { max-width: 60em; color: #555; }
"""


def _html_table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _embedded_image(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def render_html(content: ReportContent) -> str:
    runs = ", ".join(f"<code>{html.escape(r)}</code>" for r in content.runs)
    judges = ", ".join(f"<code>{html.escape(j)}</code>" for j in content.judges) or "none (unscored rows)"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>Erasure probe report</title>',
        f"<style>{STYLE}</style></head><body>",
        "<h1>Erasure probe report</h1>",
        f"<p>Created {html.escape(content.created_at)} from {content.rows} rows of: {runs}</p>",
        f"<p>Judges: {judges}</p>",
        f'<p class="note">{html.escape(STATISTICS_NOTE)}</p>',
        "<h2>Probes x methods (mean over concepts)</h2>",
        _html_table(*paper_rows(content.paper)),
        "<h2>Per cell</h2>",
        _html_table(*cell_rows(content.cells)),
        "<h2>Plots</h2>",
        *[f"<figure>{_embedded_image(path, title)}</figure>" for title, path in content.plots],
        "<h2>Images</h2>",
    ]
    for cell, path in content.sheets:
        title = sheet_title(cell)
        parts.append(f"<h3>{html.escape(title)}</h3><figure>{_embedded_image(path, title)}</figure>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_html(content: ReportContent, path: Path) -> None:
    path.write_text(render_html(content), encoding="utf-8")
