"""Render the report's sections with jinja2: Markdown (images linked as files) and one HTML file
with inline CSS: self-contained (images as base64 data URIs, nothing fetched) while its sheets are
small, else the sheets linked as files beside it (a section's `embed` says which)."""

from __future__ import annotations

import base64
from pathlib import Path

from jinja2 import Environment, PackageLoader, select_autoescape

from engine.report.sections import STATISTICS_NOTE, Section, report_sections
from engine.report.tables import ReportContent


def _environment() -> Environment:
    environment = Environment(
        loader=PackageLoader("engine.report", "templates"),
        autoescape=select_autoescape(enabled_extensions=("html.j2",), default_for_string=False),
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    environment.filters["data_uri"] = lambda path: "data:image/png;base64," + base64.b64encode(
        Path(path).read_bytes()
    ).decode("ascii")
    environment.filters["md_cell"] = lambda text: str(text).replace("|", "\\|")
    return environment


def _context(content: ReportContent, sections: list[Section] | None = None) -> dict:
    return {
        "content": content,
        "sections": report_sections(content) if sections is None else sections,
        "note": STATISTICS_NOTE,
        "relative": lambda path: Path(path).relative_to(content.output).as_posix(),
    }


# `sections`: computed once by the caller when it renders both files (a grid's tables take minutes).


def render_markdown(content: ReportContent, sections: list[Section] | None = None) -> str:
    return _environment().get_template("report.md.j2").render(**_context(content, sections))


def render_html(content: ReportContent, sections: list[Section] | None = None) -> str:
    return _environment().get_template("report.html.j2").render(**_context(content, sections))


def write_markdown(content: ReportContent, path: Path, sections: list[Section] | None = None) -> None:
    path.write_text(render_markdown(content, sections), encoding="utf-8")


def write_html(content: ReportContent, path: Path, sections: list[Section] | None = None) -> None:
    path.write_text(render_html(content, sections), encoding="utf-8")
