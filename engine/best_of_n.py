"""Shared parameters of best-of-N probes (noise sweep, classifier-guidance sweeps).

A best-of-N probe makes several candidates per prompt and either keeps the one its `selector`
ranks highest (design.md §4: never the judge by default, since selecting with the judge inflates
recovery) or writes every candidate as its own row (`keep_all_candidates`).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from engine.probe import ProbeBatch, ProbeParams


def unique_values(values: list[float], minimum: float | None = None, strict: bool = False) -> list[float]:
    """A sweep list's check: non-empty, no repeats, every value >= minimum (> minimum if strict)."""
    if not values:
        raise ValueError("give at least one value")
    if len(set(values)) != len(values):
        raise ValueError(f"values listed more than once: {values}")
    if minimum is not None and any(v < minimum or (strict and v == minimum) for v in values):
        raise ValueError(f"values must be {'>' if strict else '>='} {minimum}")
    return values


class BestOfNParams(ProbeParams):
    """How one candidate per prompt is chosen, or kept all."""

    # The names of engine.scoring.selectors.SelectorName, spelled out so probes import no scoring code.
    selector: Literal["clip", "judge", "latent_classifier", "none"] = Field(
        "clip",
        description="Picks one candidate per prompt: clip, judge (inflates recovery when it also judges), "
        "latent_classifier, or none (only with keep_all_candidates).",
    )
    keep_all_candidates: bool = Field(
        False, description="Write every candidate of the sweep as its own row instead of the selected one."
    )
    candidate_batch_size: int = Field(
        16, ge=1, description="Candidates denoised together in one UNet batch (memory vs speed)."
    )

    @model_validator(mode="after")
    def _selector_or_keep_all(self):
        if self.selector == "none" and not self.keep_all_candidates:
            raise ValueError(
                "selector 'none' picks no candidate: set keep_all_candidates: true (one row per candidate) "
                "or a selector (clip, judge, latent_classifier)"
            )
        return self


def select_per_row(batch: ProbeBatch, selector: str, images: list[np.ndarray], per_row: int):
    """The selector's pick among each row's `per_row` consecutive candidates.

    Yields (row index, candidate images, chosen index, scores of all candidates) per row."""
    for index, row in enumerate(batch.rows):
        row_images = images[index * per_row : (index + 1) * per_row]
        scores = [float(s) for s in batch.context.selector_scores(selector, row_images, row.target_concept,
                                                                    [None] * per_row)]
        if len(scores) != per_row:
            raise RuntimeError(f"selector {selector!r} returned {len(scores)} scores for {per_row} images")
        yield index, row_images, int(np.argmax(scores)), scores
