"""Interference probe: the erased model generates the OTHER concepts' prompts (side effects of erasure).

As the original: for every other concept, its first n prompts (`df.head(n)` in file order, not the
sampled rows the other probes use), each with its own seed, through the model's own pipeline
(scheduler, CFG, steps as the standard probe). Every row carries `target_concept` = the other
concept, so judges score it against that concept; `concept` stays the erased one.

The other concepts are those of the concept set (`concept_set` in configs/concepts) the grid
hands over: for a model that declares what it erased, every other concept of the set, whatever
the run lists (the original drew all 12 others); for a model that declares nothing, the run's
concepts (the set, in a one-concept run). Sets never mix: a real concept never draws a toy one.
The base model's reference for a concept is that concept's own first n prompts, the rows every
erased model's interference on it is compared with. (The original also scored its own concept's
prompts as a fake concept "debug original"; the standard_prompt probe covers those here:
docs/deviations.md.)
"""

from __future__ import annotations

from engine.errors import UserError
from engine.probe import Probe, ProbeBatch, ProbeOutput, ProbeParams
from probes.standard_prompt import StandardPromptProbe


class InterferenceParams(ProbeParams):
    """Only the shared generation parameters; the prompts are the other concepts' first n rows."""


class InterferenceProbe(Probe[InterferenceParams]):
    """The erased model draws the other concepts of its set: what erasure broke (preservation)."""

    name = "interference"
    params_class = InterferenceParams
    smoke_params = {}
    sampler = "pipeline"
    role = "preservation"
    needs_base_reference = False
    best_of_n = False
    base_reference = True
    baseline = False

    def work_prompts(self, concept, concepts, num_images: int, params: InterferenceParams):
        """(other concept, prompt_index, prompt, seed): the first `num_images` rows of every other
        concept of `concepts` in `concept`'s set, in file order (the original's df.head(n)).
        """
        others = [c for c in concepts.values() if c.name != concept.name and c.concept_set == concept.concept_set]
        if not others:
            raise UserError(
                f"interference generates the other concepts' prompts; concept set {concept.concept_set!r} of "
                f"{concept.name} has no other concept here: add one to the run or to configs/concepts"
            )
        rows: list[tuple[str, int, str, int]] = []
        for other in others:
            rows.extend((other.name, index, prompt, seed) for index, prompt, seed in other.first_prompts(num_images))
        return rows

    def reference_prompts(self, concept, num_images: int, params: InterferenceParams):
        """The base model draws the concept's own first `num_images` rows: the reference of every
        erased model's interference rows that target it.
        """
        return [(concept.name, index, prompt, seed) for index, prompt, seed in concept.first_prompts(num_images)]

    def run(self, batch: ProbeBatch) -> ProbeOutput:
        # 1. The other concepts' prompts generated exactly as the standard probe generates (the
        #    model's own pipeline, one generator per row seeded by its seed).
        output = StandardPromptProbe().run(batch)
        # 2. The extras name the erased concept next to the target it is scored on (none for the
        #    base model's reference rows: it erased nothing).
        output.extras = [{"erased_concept": None if r.role == "base" else r.concept, "target_concept": r.target_concept}
                         for r in batch.rows]
        return output
