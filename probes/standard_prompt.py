"""Standard prompt probe: plain text-to-image generation of the concept's prompt.

The baseline every other probe is compared with, as the original's: the model's own scheduler, CFG
7.5 and 50 steps by default, one generator per row seeded by the row's seed on the CPU, so a
seed gives the same initial noise as the original's `torch.manual_seed(seed)`. Prompt embeddings
come from engine.sampling's per-actor cache: a unit of one concept's prompt encodes it once.
"""

from __future__ import annotations

import torch

from engine import sampling
from engine.probe import Probe, ProbeBatch, ProbeOutput, ProbeParams, row_generator


class StandardPromptParams(ProbeParams):
    """Only the shared generation parameters."""


class StandardPromptProbe(Probe[StandardPromptParams]):
    """The concept's own prompt through the model's own pipeline and scheduler: the baseline."""

    name = "standard_prompt"
    params_class = StandardPromptParams
    smoke_params = {}
    sampler = "pipeline"
    role = "recovery"
    needs_base_reference = False
    best_of_n = False
    base_reference = True
    baseline = True

    @torch.no_grad()
    def run(self, batch: ProbeBatch) -> ProbeOutput:
        params = batch.params
        # 1. One generator per row: a row's noise never depends on its neighbours in the batch.
        generators = [row_generator(seed) for seed in batch.seeds]
        # 2. Text embeddings: each distinct prompt (and the negative prompt, with CFG) encoded once.
        pipe = batch.pipeline
        prompt_embeds = sampling.prompt_embeddings(pipe, batch.prompts)
        negative_embeds = None
        if params.guidance_scale > 1.0:
            negative_embeds = sampling.prompt_embeddings(pipe, [params.negative_prompt] * len(batch.rows))
        # 3. Batched generation through the model's own pipeline and scheduler.
        # 4. uint8 images, one per row.
        return ProbeOutput(images=sampling.pipeline_images(pipe, params, prompt_embeds, negative_embeds, generators))
