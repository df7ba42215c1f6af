"""Aligned plain-text tables for the terminal (`engine plan`, `engine run`'s row counts), laid out by
rich. The lines carry no colour or box characters: they go to logs and pipes as they are, and tests
read them."""

from __future__ import annotations

import io
from collections.abc import Sequence

from rich import box
from rich.console import Console
from rich.table import Table

WIDE = 10_000  # never wrap: a long model name widens its column instead of breaking the line


def text_table(
    headers: Sequence[str], rows: Sequence[Sequence[object]], numeric: Sequence[bool] | None = None,
    indent: int = 2,
) -> list[str]:
    """The table as lines: a header line, a rule under it, one line per row. `numeric` columns are
    right-aligned (default: those whose every value is a number); integers get thousands separators."""
    if numeric is None:
        numeric = [all(isinstance(row[i], int | float) for row in rows) and bool(rows) for i in range(len(headers))]
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1), header_style="")
    for header, is_number in zip(headers, numeric, strict=True):
        table.add_column(header, justify="right" if is_number else "left", no_wrap=True)
    for row in rows:
        table.add_row(*(_cell(value) for value in row))
    buffer = io.StringIO()
    Console(file=buffer, width=WIDE, color_system=None, force_terminal=False, highlight=False).print(table)
    lines = [line.rstrip() for line in buffer.getvalue().splitlines()]
    return [" " * indent + line for line in lines if line.strip()]


def _cell(value: object) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,d}"
    return str(value)
