"""Room for a run's output, checked before any work: the rows' estimated size against the free space
of a local output folder (`engine run` refuses a run that cannot fit; `engine plan` prints both).

The estimate is rows x image pixels x PNG_BYTES_PER_PIXEL + ROW_OVERHEAD_BYTES per row. The figure
was measured with engine.results.encode_png (the rows' own PNG encoder) on:
- a photograph (matplotlib's grace_hopper.jpg) resized to 512x512, standing in for SD 1.x output:
  1.55 bytes per pixel (768x768: 1.31), i.e. about 400 KB per 512x512 image, as seen on real runs;
- the toy world's toy-base images (32x32, 10 steps): 1.66;
- the random `tiny` pipeline's noise-like images (64x64): 2.76 (noise barely compresses).
1.6 covers trained models, whose images are what large runs write; a random built-in's rows are a
few KB each, and a test-sized run either fits or is refused either way.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from engine.errors import UserError
from engine.probe import WorkRow
from engine.specs.runs import ModelSpec
from engine.storage import OutputLocation, output_location

logger = logging.getLogger(__name__)

PNG_BYTES_PER_PIXEL = 1.6
ROW_OVERHEAD_BYTES = 2048  # the row's other columns (prompt, ids, scores) and Parquet's per-file share
SD1_IMAGE_SIDE = 512  # a hub model whose config is not read here: SD 1.x's native size
HEADROOM = 1.1  # the estimate is an estimate: ask for 10% more than it


@dataclass(frozen=True)
class RoomCheck:
    output: str
    needed_bytes: int
    free_bytes: int | None  # None: not a local folder (an object store), not checked

    @property
    def fits(self) -> bool:
        return self.free_bytes is None or self.needed_bytes * HEADROOM <= self.free_bytes


def human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(count) < 1000 or unit == "TB":
            return f"{count:,.0f} {unit}" if unit == "B" else f"{count:,.1f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")


def model_image_side(model: ModelSpec) -> int:
    """The side of the model's images (pixels) when a probe does not set height/width."""
    from engine.models.builtin import BUILTIN_MODELS

    if model.pretrained in BUILTIN_MODELS:
        return BUILTIN_MODELS[model.pretrained].image_side
    return _folder_image_side(model.pretrained) or SD1_IMAGE_SIDE


@cache
def _folder_image_side(source: str) -> int | None:
    """A local diffusers folder's UNet sample size x the VAE's downscaling; None if not readable."""
    folder = Path(source)
    try:
        unet = json.loads((folder / "unet" / "config.json").read_text())
        vae = json.loads((folder / "vae" / "config.json").read_text())
        return int(unet["sample_size"]) * 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def estimate_bytes(rows: Iterable[WorkRow], models: dict[str, ModelSpec]) -> int:
    """The result files' estimated size for these rows (`models`: the run's models by name)."""
    total = 0
    sides: dict[str, int] = {}
    for row in rows:
        params = json.loads(row.params) if row.params else {}
        if row.model not in sides:
            model = models.get(row.model)
            sides[row.model] = model_image_side(model) if model is not None else SD1_IMAGE_SIDE
        side = sides[row.model]
        pixels = (params.get("height") or side) * (params.get("width") or side)
        total += round(pixels * PNG_BYTES_PER_PIXEL) + ROW_OVERHEAD_BYTES
    return total


def free_bytes(output: str | OutputLocation) -> int | None:
    """Free space where a local output goes (its nearest existing folder); None for an object store."""
    location = output_location(output)
    if not location.is_local:
        return None
    folder = location.local_path()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def check_room(grid, pending: list[WorkRow]) -> RoomCheck:
    """The room check of a run's pending rows."""
    models = {m.name: m for m in [*grid.models, *([grid.base] if grid.base else [])]}
    return RoomCheck(grid.spec.output, estimate_bytes(pending, models), free_bytes(grid.spec.output))


def require_room(check: RoomCheck, rows: int) -> None:
    """Stop before any work when the rows cannot fit (UserError: one line, exit 2)."""
    if not check.fits:
        raise UserError(
            f"not enough space for {check.output}: {rows:,} rows need about {human_bytes(check.needed_bytes)} "
            f"(PNG at {PNG_BYTES_PER_PIXEL} bytes per pixel), {human_bytes(check.free_bytes or 0)} free; "
            "free space, choose another --output, or pass --no-space-check"
        )


def room_lines(check: RoomCheck, rows: int) -> list[str]:
    """`engine plan`'s lines about the output's size."""
    lines = [f"estimated output size: {human_bytes(check.needed_bytes)} for {rows:,} rows (PNG at "
             f"{PNG_BYTES_PER_PIXEL} bytes per pixel, + {ROW_OVERHEAD_BYTES // 1024} KB per row)"]
    if check.free_bytes is None:
        lines.append(f"  free space at {check.output}: not checked (not a local folder)")
    else:
        verdict = "fits" if check.fits else "DOES NOT FIT: `engine run` will refuse it (--no-space-check overrides)"
        lines.append(f"  free space at {check.output}: {human_bytes(check.free_bytes)} ({verdict})")
    return lines
