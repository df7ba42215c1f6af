"""Report pictures: recovery bar charts with 95% CI error bars, and per-cell contact sheets.

Plots use matplotlib's object API (Figure + Agg canvas), never pyplot, so no global state or
display is touched. Contact sheets are drawn with Pillow: each image with its seed, prompt and
scores underneath.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from engine.metrics.columns import METRICS
from engine.report.images import ImageIndex
from engine.report.tables import CELL_GROUP, cell_slug, method_label, method_order, probe_order
from engine.results import decode_png

THUMBNAIL = 128
COLUMNS = 6
FONT_SIZE = 11
# zlib level 1: a grid's thousands of sheets encode several times faster than at the default 6, for
# files about a fifth larger (deflate's later levels gain little on photographs).
SHEET_COMPRESSION = 1


def _value(row: pd.Series | None, column: str) -> float:
    if row is None or row[column] is None or pd.isna(row[column]):
        return math.nan
    return float(row[column])


def write_recovery_plots(pooled: pd.DataFrame, folder: Path, scope: str) -> list[tuple[str, Path]]:
    """One grouped bar chart per plotted metric: probes on x, one bar per method, with 95% CI bars.
    `scope` says which rows were pooled (e.g. "erased concepts"), for the title."""
    from matplotlib.figure import Figure

    folder.mkdir(parents=True, exist_ok=True)
    probes, methods = probe_order(pooled["probe_label"]), method_order(pooled["method"])
    index = {(r["probe_label"], r["method"]): r for _, r in pooled.iterrows()}
    written = []
    for metric in (m for m in METRICS if m.plotted):
        if pooled[metric.value].isna().all():
            continue  # e.g. top-1 of a run with style concepts only: nothing to plot
        figure = Figure(figsize=(max(6.0, 1.3 * len(probes) * max(1, len(methods)) / 2), 4.2))
        axes = figure.subplots()
        width = 0.8 / max(1, len(methods))
        for position, method in enumerate(methods):
            rows = [index.get((probe, method)) for probe in probes]
            values = np.array([_value(r, metric.value) for r in rows]) * metric.scale
            lows = np.array([_value(r, metric.ci_low) for r in rows]) * metric.scale
            highs = np.array([_value(r, metric.ci_high) for r in rows]) * metric.scale
            # A cell with one image has no interval: no error bar rather than a fake one.
            errors = np.nan_to_num(np.vstack([values - lows, highs - values]), nan=0.0)
            x = np.arange(len(probes)) - 0.4 + width * (position + 0.5)
            axes.bar(x, values, width, yerr=errors, capsize=3, label=method_label(method))
        axes.set_xticks(np.arange(len(probes)), probes, rotation=15, ha="right")
        axes.set_ylabel(metric.label)
        title = f"{metric.label} by probe"
        axes.set_title(f"{title} ({scope}, 95% CI)")
        if metric.kind == "rate":
            axes.set_ylim(0, 105)
        axes.legend(fontsize=8)
        figure.tight_layout()
        path = folder / f"{metric.key}.png"
        figure.savefig(path, dpi=100)
        written.append((title, path))
    return written


# --------------------------------------------------------------------------- contact sheets


def _prompt_lines(prompt: str, width: int = 24, most: int = 2) -> list[str]:
    lines = textwrap.wrap(prompt, width) or [""]
    if len(lines) > most:  # the full prompt is in the tables; mark the cut
        lines = [*lines[: most - 1], textwrap.shorten(" ".join(lines[most - 1 :]), width, placeholder="...")]
    return lines


def _score_lines(row: dict[str, Any]) -> list[str]:
    means, hits = [], []
    for metric in METRICS:
        value = row.get(metric.column)
        if value is None or (isinstance(value, float) and pd.isna(value)):
            continue
        if metric.kind == "rate":
            hits.append(f"{metric.key} {'yes' if value else 'no'}")
        elif metric.plotted:
            means.append(f"{metric.key} {float(value):.{metric.digits - 1}f}")
    lines = ["  ".join(part) for part in (means, hits) if part]
    return lines or ["unscored"]


def contact_sheet(images: list[np.ndarray], captions: list[list[str]], title: str) -> Image.Image:
    """A grid of thumbnails, each with its caption lines underneath, under a title line."""
    font = ImageFont.load_default(size=FONT_SIZE)
    line_height = FONT_SIZE + 3
    caption_lines = max((len(c) for c in captions), default=0)
    # Tiles as wide as the widest caption line, so no caption runs into its neighbour.
    tile_width = max([THUMBNAIL, *[math.ceil(font.getlength(line)) for c in captions for line in c]]) + 8
    tile_height = THUMBNAIL + 4 + caption_lines * line_height + 6
    columns = max(1, min(COLUMNS, len(images)))
    rows = max(1, math.ceil(len(images) / columns))
    header = line_height + 10
    width = max(columns * tile_width + 8, math.ceil(font.getlength(title)) + 16)
    sheet = Image.new("RGB", (width, header + rows * tile_height), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((8, 5), title, fill="black", font=font)
    for index, (image, lines) in enumerate(zip(images, captions, strict=False)):
        left = 8 + (index % columns) * tile_width
        top = header + (index // columns) * tile_height
        thumbnail = Image.fromarray(image)
        scale = THUMBNAIL / max(thumbnail.size)
        # Upscale small test images without smoothing; shrink real ones smoothly.
        resample = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS
        size = (max(1, round(thumbnail.width * scale)), max(1, round(thumbnail.height * scale)))
        thumbnail = thumbnail.resize(size, resample)
        sheet.paste(thumbnail, (left, top))
        for line_number, line in enumerate(lines):
            draw.text((left, top + THUMBNAIL + 4 + line_number * line_height), line, fill="black", font=font)
    return sheet


def write_contact_sheets(
    index: ImageIndex, frame: pd.DataFrame, cells: pd.DataFrame, folder: Path, max_images: int,
    wanted: Callable[[dict[str, Any]], bool] = lambda cell: True,
) -> list[tuple[dict[str, Any], Path]]:
    """A PNG per cell (same order as `cells`) with its first `max_images` rows by prompt index and
    seed, for the cells `wanted` accepts. Images are read one cell at a time (engine.report.images)."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = CELL_GROUP
    chosen = {
        key: group.sort_values(["prompt_index", "seed", "row_id"]).head(max_images)
        for key, group in frame.groupby(keys, sort=True, dropna=False)
    }
    written = []
    for _, cell in cells.iterrows():
        key = tuple(cell[k] for k in keys)
        if key not in chosen or not wanted(cell.to_dict()):
            continue  # every row of the cell failed (nothing to show), or --cells leaves it out
        rows = chosen[key].to_dict("records")
        images = index.images(r["row_id"] for r in rows)
        rows = [r for r in rows if r["row_id"] in images]
        captions = [
            [f"seed {r['seed']}", *_prompt_lines(r["prompt"]), *_score_lines(r)] for r in rows
        ]
        title = f"{cell['model']} / {cell['concept']}"
        title += f" -> {cell['target_concept']}" if cell["target_concept"] != cell["concept"] else ""
        title += f" / {cell['probe_label']}"
        sheet = contact_sheet([decode_png(images[r["row_id"]]) for r in rows], captions, title)
        path = folder / f"{cell_slug(cell)}.png"
        sheet.save(path, format="PNG", compress_level=SHEET_COMPRESSION)
        written.append((cell.to_dict(), path))
    return written
