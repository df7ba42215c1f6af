"""Latent-classifier training data never overlaps evaluation: for every concept and every probe,
the rows the training images are generated from share no (prompt, seed) row, and not even a seed,
with any row a probe can evaluate; generated negatives come from the positive's own concept set."""

from __future__ import annotations

from collections import defaultdict

import pytest

from classifier_training.data import evaluation_seeds, training_rows, training_seeds
from classifier_training.jobs import TrainRequest, plan_jobs
from engine.errors import UserError
from engine.models.resolve import resolve_model
from engine.pipeline.grid import ProbeChoice, expand_rows
from engine.probe import PROBE_REGISTRY, parse_params
from engine.specs.concepts import available_concepts, concept_set_members, load_concept
from probes.textual_inversion import TextualInversionParams, TextualInversionProbe

CONCEPTS = sorted(available_concepts())
TRAINING_IMAGES = 1000  # ten times train-classifier's default --num-images


def concept_sets() -> dict[str, dict]:
    sets = defaultdict(dict)
    for name in CONCEPTS:
        concept = load_concept(name)
        sets[concept.concept_set][name] = concept
    return sets


def evaluation_rows() -> dict[str, set[tuple[str, int]]]:
    """Per probe, every (prompt, seed) it evaluates: what the grid expands with the probe's default
    params for each concept set at the largest num_images its concepts allow (the whole prompt/seed
    list), so interference's first rows of the other concepts are in; plus the reference rows of
    inpainting (the rows themselves) and of textual inversion (at its largest num_reference_images)."""
    model, base = resolve_model("tiny-erased"), resolve_model("tiny")
    rows: dict[str, set[tuple[str, int]]] = {}
    for probe in sorted(PROBE_REGISTRY):
        choice = ProbeChoice(probe, parse_params(probe, {}))
        rows[probe] = set()
        for members in concept_sets().values():
            most = min(len(c.seed_list()) for c in members.values())
            rows[probe] |= {(r.prompt, r.seed) for r in expand_rows([model], base, members, [choice], most)}
            for concept in members.values():  # each concept alone, at its own maximum
                if probe != "interference":
                    alone = expand_rows([model], base, {concept.name: concept}, [choice], len(concept.seed_list()))
                    rows[probe] |= {(r.prompt, r.seed) for r in alone}
    references = set()
    for name in CONCEPTS:
        concept = load_concept(name)
        params = TextualInversionParams(num_reference_images=len(concept.seed_list()))
        references |= {(r.prompt, r.seed) for r in TextualInversionProbe.reference_rows(params, concept)}
    rows["textual_inversion"] |= references
    return rows


@pytest.fixture(scope="module")
def evaluated():
    return evaluation_rows()


def test_the_evaluation_rows_cover_every_probe_and_concept(evaluated):
    assert set(evaluated) == set(PROBE_REGISTRY)
    for probe, rows in evaluated.items():
        prompts = {prompt for prompt, _ in rows}
        assert prompts == {load_concept(name).prompt for name in CONCEPTS}, probe
        # The whole seed list of each concept is evaluated (the most any run can reach).
        for name in CONCEPTS:
            concept = load_concept(name)
            assert {(concept.prompt, seed) for seed in concept.seed_list()} <= rows, (probe, name)


@pytest.mark.parametrize("name", CONCEPTS)
def test_training_rows_are_disjoint_from_every_probes_evaluation_rows(name, evaluated):
    concept = load_concept(name)
    training = training_rows(concept, TRAINING_IMAGES)
    assert len(training) == TRAINING_IMAGES
    assert {prompt for _, prompt, _ in training} == {concept.prompt}
    seeds = [seed for _, _, seed in training]
    assert len(set(seeds)) == TRAINING_IMAGES
    for probe, rows in evaluated.items():
        assert not {(prompt, seed) for _, prompt, seed in training} & rows, probe
        # Stronger: no training seed is any evaluated seed, so no training image starts from the
        # initial noise of any probe's image, whatever its prompt.
        assert not set(seeds) & {seed for _, seed in rows}, probe
    assert not set(seeds) & evaluation_seeds()


def test_each_concept_has_its_own_reproducible_stream():
    exclude = evaluation_seeds()
    streams = {name: training_seeds(name, 50, exclude) for name in CONCEPTS}
    assert streams["church"] == training_seeds("church", 50, exclude)  # reproducible
    assert training_seeds("church", 10, exclude) == streams["church"][:10]  # a prefix grows, never reshuffles
    everything = [seed for seeds in streams.values() for seed in seeds]
    assert len(set(everything)) == len(everything)  # no two concepts share a training seed
    # A seed in the excluded set is skipped, not used.
    first = training_seeds("church", 1, set())[0]
    assert first not in training_seeds("church", 5, {first})


def test_generated_negatives_come_from_the_positives_concept_set_only():
    for name in ("church", "toy_circle"):
        concept = load_concept(name)
        _, [job] = plan_jobs(TrainRequest([name], model="tiny"))
        assert set(job.negative_concepts) == set(concept_set_members(concept)) - {name}
        assert all(load_concept(n).concept_set == concept.concept_set for n in job.negative_concepts)
    _, [job] = plan_jobs(TrainRequest(["church"], model="tiny"))
    assert len(job.negative_concepts) == 12 and not any(n.startswith("toy_") for n in job.negative_concepts)
    _, [job] = plan_jobs(TrainRequest(["toy_circle"], model="tiny"))
    assert sorted(job.negative_concepts) == sorted(f"toy_{s}" for s in
                                                   ("bars", "cross", "diamond", "ring", "square", "star", "triangle"))
    with pytest.raises(UserError, match="negatives come from the positive's own set"):
        plan_jobs(TrainRequest(["church"], model="tiny", negative_concepts=["toy_square"]))
