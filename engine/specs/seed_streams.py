"""Seed streams for training data that no probe evaluates.

Anything a probe learns from (a latent classifier's images, textual inversion's reference images)
is drawn from its own stream of seeds, disjoint from every seed a probe can evaluate with, so an
evaluated row is never a training image: seed k of stream s for concept c is the first 62 bits of
sha256(json [s, c, k]), k = 0, 1, ..., skipping the evaluation seeds.
"""

from __future__ import annotations

import hashlib
import json

from engine.specs.concepts import available_concepts, load_concept


def evaluation_seeds() -> set[int]:
    """Every seed a probe can evaluate with: all rows of every configured concept's prompt/seed list
    (num_images reaches at most the whole list; interference's first rows and the reference images
    of inpainting are rows of these lists too)."""
    return {seed for name in available_concepts() for seed in load_concept(name).seed_list()}


def stream_seeds(stream: str, concept: str, count: int, exclude: set[int] | None = None) -> list[int]:
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
