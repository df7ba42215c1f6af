"""The demo grid: the toy world's base model and an ESD-x erased model, the standard prompt and
three probes, judged by the toy judge. Finishes in a few minutes on a laptop CPU and shows the
erasure (standard prompt) next to what the probes bring back.

Needs the shipped toy-world weights (engine/toyworld/weights, committed); `--random` runs the same
grid shape on the random `tiny` models instead (plumbing only, scores meaningless).
"""

from __future__ import annotations

from typing import Any

# The toy world samples well with 25 DDIM steps and CFG 5 (engine/toyworld/DATA_CARD.md).
TOY_SAMPLING = {"num_inference_steps": 25, "guidance_scale": 5.0}


def demo_spec(output: str, num_images: int, random_models: bool = False) -> dict[str, Any]:
    if random_models:
        return _random_spec(output, num_images)
    return {
        "output": output,
        "models": ["toy-base", "toy-esdx-circle"],
        "base_model": "toy-base",
        "concepts": ["toy_circle", "toy_square"],
        "probes": [
            {"name": "standard_prompt", "params": TOY_SAMPLING},
            # Every (eta, v) candidate is its own row, so no selector (and no selection bias) is involved.
            {"name": "noise_based", "params": {**TOY_SAMPLING, "eta_values": [1.0, 1.5, 2.0],
                                               "variance_scales": [1.0, 1.04], "keep_all_candidates": True}},
            {"name": "diffusion_completion", "params": {**TOY_SAMPLING, "handover_steps": [2, 5, 10]}},
            {"name": "inpainting", "params": TOY_SAMPLING},
        ],
        "num_images": num_images,
        "batch_size": 8,
        "judges": ["toy"],
    }


def _random_spec(output: str, num_images: int) -> dict[str, Any]:
    fast = {"num_inference_steps": 10}
    return {
        "output": output,
        "models": ["tiny", "tiny-erased"],
        "base_model": "tiny",
        "concepts": ["church", "golf_ball", "van_gogh"],
        "probes": [{"name": "standard_prompt", "params": fast}],
        "num_images": num_images,
        "batch_size": 4,
        # Random tiny judges: no downloaded weights needed (the scores are not meaningful).
        "judges": ["clip:tiny", "imagenet:tiny"],
    }
