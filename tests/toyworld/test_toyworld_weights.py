"""Checks of the shipped toy-world weights on a small fixed sample (CI does not retrain the world).

The issue's bars, on the first seeds of each toy concept config, DDIM 25 steps, guidance 5 (the
data card's sampler): the judge is near-perfect on fresh renders; the base model's judge top-1 is
>= 80% on every concept; each ESD-x model draws its erased concept <= 20% of the time while every
other concept keeps >= 70% of the base model's rate. The data card gives the full-size numbers.
"""

from __future__ import annotations

import numpy as np
import pytest

from engine.toyworld.render import CONCEPTS, render_dataset
from engine.toyworld.shipped import WEIGHTS_DIR

pytestmark = [
    pytest.mark.slow,  # the toy models' rates on 16 seeds x 8 concepts (about a minute)
    pytest.mark.skipif(not (WEIGHTS_DIR / "toy-base" / "model_index.json").exists(),
                       reason="toy-world weights not built (engine toyworld build)"),
]

NUM_SEEDS = 16


def _seeds() -> list[int]:
    from engine.specs.concepts import load_concept

    return [seed for _, _, seed in load_concept("toy_circle").first_prompts(NUM_SEEDS)]


@pytest.fixture(scope="module")
def judge():
    from engine.toyworld.judge import load_toy_judge

    return load_toy_judge("cpu")


@pytest.fixture(scope="module")
def base_rates(judge):
    from engine.models.builtin import BUILTIN_MODELS
    from toyworld_training.evaluate import concept_rates

    return concept_rates(BUILTIN_MODELS["toy-base"].build(), judge, _seeds())


def test_judge_is_accurate_on_fresh_renders(judge):
    images, labels = render_dataset(50, seed=12345)
    assert (judge.classify(images).argmax(axis=1) == labels).mean() >= 0.97


def test_base_model_draws_every_concept(base_rates):
    low = {c: r["rate"] for c, r in base_rates.items() if r["rate"] < 0.8}
    assert not low, f"base judge top-1 below 80% (n={NUM_SEEDS}): {low}"


@pytest.mark.parametrize("concept", ["circle", "triangle"])
def test_esdx_model_erases_its_concept_and_keeps_the_others(concept, judge, base_rates):
    from engine.models.builtin import BUILTIN_MODELS
    from toyworld_training.evaluate import concept_rates

    rates = concept_rates(BUILTIN_MODELS[f"toy-esdx-{concept}"].build(), judge, _seeds())
    assert rates[concept]["rate"] <= 0.2, rates[concept]
    kept = {c: (rates[c]["rate"], base_rates[c]["rate"]) for c in CONCEPTS
            if c != concept and rates[c]["rate"] < 0.7 * base_rates[c]["rate"]}
    assert not kept, f"concepts below 70% of the base rate (erased, base): {kept}"
    assert np.mean([rates[c]["rate"] for c in CONCEPTS if c != concept]) >= 0.7
