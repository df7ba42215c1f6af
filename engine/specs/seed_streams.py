"""Seed streams for training data that no probe evaluates.

Anything a probe learns from (a latent classifier's images, textual inversion's reference images)
is drawn from its own stream of seeds, disjoint from every seed a probe can evaluate with, so an
evaluated row is never a training image: seed k of stream s for concept c is the first 62 bits of
sha256(json [s, c, k]), k = 0, 1, ..., skipping the evaluation seeds.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Set
from pathlib import Path

from engine.specs.concepts import available_concepts, load_concept_file


def evaluation_seeds() -> frozenset[int]:
    """Every seed a probe can evaluate with: all rows of every configured concept's prompt/seed list
    (num_images reaches at most the whole list; interference's first rows and the reference images
    of inpainting are rows of these lists too)."""
    # Read once per state of the concept files: a plan asks once per textual inversion row (2,730
    # in the paper grid), and reading every concept file each time took most of `engine plan`.
    files = tuple(sorted((str(path), path.stat().st_mtime_ns) for path in available_concepts().values()))
    return _seeds_in(files)


@functools.lru_cache(maxsize=4)
def _seeds_in(files: tuple[tuple[str, int], ...]) -> frozenset[int]:
    return frozenset(seed for path, _ in files for seed in load_concept_file(Path(path)).seed_list())


def stream_seeds(stream: str, concept: str, count: int, exclude: Set[int] | None = None) -> list[int]:
    """The first `count` seeds of `stream` for `concept`, none of them in `exclude` (default: every
    evaluation seed)."""
    exclude = evaluation_seeds() if exclude is None else exclude
    seeds: list[int] = []
    index = 0
    while len(seeds) < count:
        text = json.dumps([stream, concept, index], separators=(",", ":"))
        seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 2
        if seed not in exclude and seed not in seeds:
            seeds.append(seed)
        index += 1
    return seeds
