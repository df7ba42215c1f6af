"""Standard prompt probe: plain text-to-image generation of the concept's prompt.

The baseline every other probe is compared with, as the original's: the model's own scheduler, CFG
7.5 and 50 steps by default, one generator per row seeded by the row's seed on the CPU, so a
seed gives the same initial noise as the original's `torch.manual_seed(seed)`.
"""

from __future__ import annotations

import torch

from engine.probe import Probe, ProbeBatch, ProbeOutput, ProbeParams, row_generator, to_uint8


class StandardPromptParams(ProbeParams):
    """Only the shared generation parameters."""


class StandardPromptProbe(Probe):
    name = "standard_prompt"
    params_class = StandardPromptParams

    @torch.no_grad()
    def run(self, batch: ProbeBatch) -> ProbeOutput:
        params = batch.params
        # 1. One generator per row: a row's noise never depends on its neighbours in the batch.
        generators = [row_generator(seed) for seed in batch.seeds]
        # 2. Batched generation through the model's own pipeline and scheduler.
        result = batch.pipeline(
            prompt=batch.prompts,
            negative_prompt=[params.negative_prompt] * len(batch.rows) if params.negative_prompt else None,
            num_inference_steps=params.num_inference_steps,
            guidance_scale=params.guidance_scale,
            height=params.height,
            width=params.width,
            generator=generators,
            output_type="np",
        )
        # 3. uint8 images, one per row.
        return ProbeOutput(images=to_uint8(result.images))
