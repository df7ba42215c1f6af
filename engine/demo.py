"""The demo grid: built-in models, a few concepts, few steps; finishes in minutes on a laptop CPU."""

from __future__ import annotations

from typing import Any

DEMO_CONCEPTS = ["church", "golf_ball", "van_gogh"]


def demo_spec(output: str, num_images: int) -> dict[str, Any]:
    fast = {"num_inference_steps": 10}
    return {
        "output": output,
        "models": ["tiny", "tiny-erased"],
        "base_model": "tiny",
        "concepts": DEMO_CONCEPTS,
        "probes": [{"name": "standard_prompt", "params": fast}],
        "num_images": num_images,
        "batch_size": 4,
        # Random tiny judges: the demo needs no downloaded weights (its scores are not meaningful).
        "judges": ["clip:tiny", "imagenet:tiny"],
    }
