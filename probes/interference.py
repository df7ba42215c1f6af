"""Interference probe: the erased model generates the OTHER concepts' prompts (side effects of erasure).

As the original: for every other concept, its first n prompts (`df.head(n)` in file order, not the
sampled rows the other probes use), each with its own seed, through the model's own pipeline
(scheduler, CFG, steps as the standard probe). Every row carries `target_concept` = the other
concept, so judges score it against that concept; `concept` stays the erased one.

The other concepts are those of the run. A run with a single concept has none, which is an error
before any work (the original also scored its own concept's prompts as a fake concept
"debug original"; the standard_prompt probe covers those here: docs/deviations.md).
"""

from __future__ import annotations

from engine.errors import UserError
from engine.probe import Probe, ProbeBatch, ProbeOutput, ProbeParams
from probes.standard_prompt import StandardPromptProbe


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

    def run(self, batch: ProbeBatch) -> ProbeOutput:
        # 1. The other concepts' prompts generated exactly as the standard probe generates (the
        #    model's own pipeline, one generator per row seeded by its seed).
        output = StandardPromptProbe().run(batch)
        # 2. The extras name the erased concept next to the target it is scored on.
        output.extras = [{"erased_concept": r.concept, "target_concept": r.target_concept} for r in batch.rows]
        return output
