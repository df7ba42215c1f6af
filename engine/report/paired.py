"""Paired image sheets: for one erased concept and probe, one line per (prompt, seed) with the base
model's image first and each method's image for the same prompt and seed beside it.

The base image is the base model's row of the same probe when the run has one, else its standard
prompt image of that prompt and seed (for inpainting that is the context the erased model repaints).
A row's scoring region (inpainting's mask box) is outlined in red.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from engine.metrics.columns import TOP5_CLASSES
from engine.probe import RECOVERY, baseline_probes
from engine.report.draws_instead import class_namer, top1_of
from engine.report.figures import SHEET_COMPRESSION
from engine.report.images import ImageIndex
from engine.report.tables import BASE_METHOD, method_label, method_order, probe_order
from engine.results import decode_png

TILE = 128
FONT_SIZE = 11


def write_paired_sheets(
    index: ImageIndex, frame: pd.DataFrame, folder: Path, max_seeds: int
) -> list[tuple[str, Path]]:
    recovery = frame[frame["role"] == RECOVERY]
    if recovery.empty:
        return []
    base = frame[frame["method"] == BASE_METHOD]
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    name = class_namer(frame)
    for concept in sorted(recovery["concept"].unique()):
        for probe in probe_order(recovery.loc[recovery["concept"] == concept, "probe_label"]):
            cell = recovery[(recovery["concept"] == concept) & (recovery["probe_label"] == probe)]
            lines = _lines(cell, base[base["concept"] == concept], probe, max_seeds)
            if not lines:
                continue
            images = index.images({r["row_id"] for line in lines for r in line[1].values() if r is not None})
            methods = method_order({m for _, tiles in lines for m in tiles})
            title = f"{concept} / {probe}: the same prompt and seed across methods"
            sheet = _draw(lines, methods, images, title, name)
            path = folder / f"paired__{concept}__{_slug(probe)}.png"
            sheet.save(path, format="PNG", compress_level=SHEET_COMPRESSION)
            written.append((title, path))
    return written


def _lines(cell: pd.DataFrame, base: pd.DataFrame, probe: str, max_seeds: int):
    """[(caption, {method: row or None})] for the first `max_seeds` (prompt, seed) pairs."""
    pairs = cell.sort_values(["prompt_index", "seed"]).drop_duplicates(["prompt", "seed"]).head(max_seeds)
    lines = []
    for _, pair in pairs.iterrows():
        same = cell[(cell["prompt"] == pair["prompt"]) & (cell["seed"] == pair["seed"])].sort_values("model")
        tiles = {method: rows.iloc[0].to_dict() for method, rows in same.groupby("method")}
        tiles[BASE_METHOD] = _base_row(base, probe, pair["prompt"], pair["seed"])
        lines.append((f"seed {pair['seed']}", tiles))
    return lines


def _base_row(base: pd.DataFrame, probe: str, prompt: str, seed: int) -> dict | None:
    same_request = base[(base["prompt"] == prompt) & (base["seed"] == seed)]
    for candidates in (same_request[same_request["probe_label"] == probe],
                       same_request[same_request["probe"].isin(baseline_probes(same_request["probe"]))]):
        if len(candidates):
            return candidates.sort_values("row_id").iloc[0].to_dict()
    return None


def _draw(lines, methods: list[str], images: dict[str, bytes], title: str,
          name: Callable[..., str] = lambda index, concept=None: f"class {index}") -> Image.Image:
    """The sheet: a line per (prompt, seed), a column per method, each tile labelled with the judge's
    top-1 class (`name` turns its index into a name)."""
    font = ImageFont.load_default(size=FONT_SIZE)
    line_height = FONT_SIZE + 4
    label_width = 70
    header = 2 * line_height + 8
    width = label_width + len(methods) * (TILE + 6) + 8
    sheet = Image.new("RGB", (max(width, math.ceil(font.getlength(title)) + 16), header + len(lines) * (TILE + 6)),
                      "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((8, 4), title, fill="black", font=font)
    for column, method in enumerate(methods):
        draw.text((label_width + column * (TILE + 6), 4 + line_height), method_label(method), fill="black", font=font)
    for row_index, (caption, tiles) in enumerate(lines):
        top = header + row_index * (TILE + 6)
        draw.text((8, top + TILE // 2 - FONT_SIZE), caption, fill="black", font=font)
        for column, method in enumerate(methods):
            row = tiles.get(method)
            left = label_width + column * (TILE + 6)
            if row is None or row["row_id"] not in images:
                draw.rectangle([left, top, left + TILE - 1, top + TILE - 1], outline="#bbbbbb")
                draw.text((left + 8, top + TILE // 2 - FONT_SIZE), "not run", fill="#888888", font=font)
                continue
            sheet.paste(_tile(decode_png(images[row["row_id"]]), row.get("scoring_region")), (left, top))
            drawn = top1_of(row.get(TOP5_CLASSES))
            if drawn is not None:  # what the judge sees: its top-1 class, on a strip at the tile's foot
                label = name(drawn, row.get("target_concept"))
                draw.rectangle([left, top + TILE - line_height, left + TILE - 1, top + TILE - 1], fill="white")
                draw.text((left + 2, top + TILE - line_height + 1), label[:18], fill="black", font=font)
    return sheet


def _tile(image: np.ndarray, region) -> Image.Image:
    picture = Image.fromarray(image)
    scale = TILE / max(picture.size)
    resample = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS
    picture = picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))), resample)
    if region is not None and not (isinstance(region, float) and math.isnan(region)) and len(region) == 4:
        left, top, right, bottom = (round(v * scale) for v in region)
        ImageDraw.Draw(picture).rectangle([left, top, right - 1, bottom - 1], outline="red", width=2)
    return picture


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in text)[:80]
