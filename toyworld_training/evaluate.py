"""Measure what a toy pipeline draws: generate each concept's caption on fixed seeds, judge it.

Generation matches the `standard_prompt` probe (one CPU generator per seed, the pipeline's own
DDIM scheduler), so a seed gives the same image here as in `engine run` with the same steps and
guidance scale.
"""

from __future__ import annotations

import numpy as np
import torch

from engine.metrics.stats import wilson_interval
from engine.toyworld.judge import ToyJudge
from engine.toyworld.render import CONCEPTS, caption

DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 5.0


@torch.no_grad()
def generate(pipe, prompt: str, seeds: list[int], num_inference_steps: int = DEFAULT_STEPS,
             guidance_scale: float = DEFAULT_GUIDANCE, batch_size: int = 64) -> np.ndarray:
    images = []
    for start in range(0, len(seeds), batch_size):
        chunk = seeds[start:start + batch_size]
        result = pipe(prompt=[prompt] * len(chunk), num_inference_steps=num_inference_steps,
                      guidance_scale=guidance_scale, output_type="np",
                      generator=[torch.Generator("cpu").manual_seed(int(s)) for s in chunk])
        images.append((np.clip(result.images, 0, 1) * 255).round().astype(np.uint8))
    return np.concatenate(images)


def concept_rates(pipe, judge: ToyJudge, seeds: list[int], concepts: tuple[str, ...] = CONCEPTS,
                  **sampling) -> dict[str, dict[str, float]]:
    """Per concept: judge top-1 rate of its own class on its caption, with n and a Wilson 95% CI,
    plus the full distribution of predicted classes."""
    out: dict[str, dict[str, float]] = {}
    for concept in concepts:
        probs = judge.classify(generate(pipe, caption(concept), seeds, **sampling))
        predicted = probs.argmax(axis=1)
        hits = int((predicted == CONCEPTS.index(concept)).sum())
        low, high = wilson_interval(hits, len(seeds))
        out[concept] = {"rate": hits / len(seeds), "n": len(seeds), "ci_low": low, "ci_high": high,
                        "predicted": {CONCEPTS[k]: int((predicted == k).sum()) for k in range(len(CONCEPTS))}}
    return out


def format_rates(rates: dict[str, dict[str, float]]) -> str:
    return " ".join(f"{c}={r['rate']:.2f}" for c, r in rates.items())
