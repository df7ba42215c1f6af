"""Procedural renderer: 8 shape concepts at 32x32 RGB with captions "a picture of a <concept>".

Shapes are drawn with PIL at 4x the size and box-downsampled (anti-aliasing), with random
foreground/background colours (a luminance gap keeps every shape visible), size, position and a
small rotation. Everything is driven by a numpy Generator, so a seed fixes the images exactly.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

CONCEPTS: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring", "star", "bars", "diamond")
IMAGE_SIZE = 32
_SUPERSAMPLE = 4
_MIN_LUMINANCE_GAP = 70.0


def caption(concept: str) -> str:
    return f"a picture of a {concept}"


def _luminance(rgb: np.ndarray) -> float:
    return float(0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2])


def _colours(rng: np.random.Generator) -> tuple[tuple[int, ...], tuple[int, ...]]:
    while True:
        fg, bg = rng.integers(0, 256, size=(2, 3))
        if abs(_luminance(fg) - _luminance(bg)) > _MIN_LUMINANCE_GAP:
            return tuple(int(v) for v in fg), tuple(int(v) for v in bg)


def _rotated(points: list[tuple[float, float]], cx: float, cy: float, angle: float) -> list[tuple[float, float]]:
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]


def _draw(draw: ImageDraw.ImageDraw, concept: str, cx: float, cy: float, r: float, angle: float, fg) -> None:
    if concept == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif concept == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fg, width=max(2, int(r * 0.3)))
    elif concept == "square":
        draw.polygon(_rotated([(-r, -r), (r, -r), (r, r), (-r, r)], cx, cy, angle * 0.25), fill=fg)
    elif concept == "diamond":
        draw.polygon(_rotated([(0, -r), (r * 0.75, 0), (0, r), (-r * 0.75, 0)], cx, cy, angle * 0.15), fill=fg)
    elif concept == "triangle":
        pts = [(r * math.cos(a), r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        draw.polygon(_rotated(pts, cx, cy, angle * 0.3), fill=fg)
    elif concept == "star":
        pts = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.42
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((radius * math.cos(a), radius * math.sin(a)))
        draw.polygon(_rotated(pts, cx, cy, angle * 0.3), fill=fg)
    elif concept == "cross":
        w = r * 0.34
        for rect in ([(-r, -w), (r, -w), (r, w), (-r, w)], [(-w, -r), (w, -r), (w, r), (-w, r)]):
            draw.polygon(_rotated(rect, cx, cy, angle * 0.25), fill=fg)
    elif concept == "bars":
        h = r * 0.22
        for offset in (-r * 0.7, 0.0, r * 0.7):
            draw.polygon(_rotated([(-r, offset - h), (r, offset - h), (r, offset + h), (-r, offset + h)],
                                  cx, cy, angle * 0.15), fill=fg)
    else:
        raise ValueError(f"unknown toy concept {concept!r}; valid: {', '.join(CONCEPTS)}")


def render(concept: str, rng: np.random.Generator) -> np.ndarray:
    """One 32x32x3 uint8 image of `concept`."""
    big = IMAGE_SIZE * _SUPERSAMPLE
    fg, bg = _colours(rng)
    half = float(rng.uniform(0.22, 0.38)) * big
    margin = half + 1
    cx = float(rng.uniform(margin, big - margin))
    cy = float(rng.uniform(margin, big - margin))
    angle = float(rng.uniform(-1.0, 1.0))
    image = Image.new("RGB", (big, big), bg)
    _draw(ImageDraw.Draw(image), concept, cx, cy, half, angle, fg)
    return np.asarray(image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX), dtype=np.uint8)


def render_dataset(num_per_concept: int, seed: int,
                   concepts: tuple[str, ...] = CONCEPTS) -> tuple[np.ndarray, np.ndarray]:
    """`num_per_concept` images of each concept, interleaved: (uint8 N x 32 x 32 x 3, int64 labels).

    Labels index into `concepts`; image i depends only on (seed, i)."""
    rng = np.random.default_rng(seed)
    n = num_per_concept * len(concepts)
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    labels = np.arange(n, dtype=np.int64) % len(concepts)
    for i in range(n):
        images[i] = render(concepts[labels[i]], rng)
    return images, labels
