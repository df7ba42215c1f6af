"""Interference probe: the erased model generates the OTHER concepts' prompts (side effects of erasure).

Original §3.8: for every other concept, its first n prompts (`df.head(n)` in file order, not the
sampled rows the other probes use), each with its own seed, through the model's own pipeline
(scheduler, CFG, steps as the standard probe). Every row carries `target_concept` = the other
concept, so judges score it against that concept; `concept` stays the erased one.

The other concepts are those of the run. A run with a single concept has none, which is an error
before any work (the original also scored its own concept's prompts as a fake concept
"debug original", §9.10; the standard_prompt probe covers those here).
"""

from __future__ import annotations

import torch

from engine.errors import UserError
from engine.probe import Probe, ProbeBatch, ProbeOutput, ProbeParams, row_generator, to_uint8


class InterferenceParams(ProbeParams):
    """Only the shared generation parameters; the prompts are the other concepts' first n rows."""


class InterferenceProbe(Probe):
    name = "interference"
    params_class = InterferenceParams

    def check_request(self, params: InterferenceParams, concepts: list[str], options) -> None:
        if len(concepts) < 2:
            raise UserError(
                "interference generates the other concepts' prompts; the run has only "
                f"{', '.join(concepts) or 'no concept'}: add at least one more concept"
            )

    def work_prompts(self, concept, concepts, num_images: int, params: InterferenceParams):
        """(other concept, prompt_index, prompt, seed): the first `num_images` rows of every other
        concept of the run, in file order (the original's df.head(n))."""
        rows = []
        for other in concepts.values():
            if other.name == concept.name:
                continue
            rows.extend((other.name, index, prompt, seed) for index, prompt, seed in other.first_prompts(num_images))
        return rows

    @torch.no_grad()
    def run(self, batch: ProbeBatch) -> ProbeOutput:
        params = batch.params
        # 1. One generator per row from its seed (the original: torch.manual_seed(seed)).
        generators = [row_generator(seed) for seed in batch.seeds]
        # 2. The other concepts' prompts through the erased model's own pipeline.
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
        # 3. uint8 images; the extras name the erased concept next to the target it is scored on.
        extras = [{"erased_concept": row.concept, "target_concept": row.target_concept} for row in batch.rows]
        return ProbeOutput(images=to_uint8(result.images), extras=extras)
