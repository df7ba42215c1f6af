"""plan_resources: how a run's stages share a cluster's GPUs (pure; made-up clusters)."""

from __future__ import annotations

import pytest

from engine.errors import UserError
from engine.pipeline.resources import StageResources, plan_resources
from engine.specs.runs import run_spec_from_dict


def _spec(**fields):
    return run_spec_from_dict({"output": "out", "models": ["tiny"], "concepts": ["church"], "num_images": 1,
                               "probes": ["standard_prompt"], "judges": ["clip:tiny"], **fields})  # fmt: skip


@pytest.mark.parametrize("gpus, fields, units, expected", [
    # No GPU: everything on the CPU, one probe actor, one scorer.
    (0, {}, 10, StageResources(1, 0.0, "cpu", 1, 0.0, "cpu")),
    # One GPU: a probe actor takes 0.9 of it, the scorer 0.1.
    (1, {}, 10, StageResources(1, 0.9, "cuda", 1, 0.1, "cuda")),
    # Four GPUs: one probe actor per GPU; the scorer's 0.1 fits beside them.
    (4, {}, 10, StageResources(4, 0.9, "cuda", 1, 0.1, "cuda")),
    # Never more actors than units.
    (4, {}, 2, StageResources(2, 0.9, "cuda", 1, 0.1, "cuda")),
    # No judges: no score stage, the probe actors take whole GPUs.
    (2, {"judges": []}, 10, StageResources(2, 1.0, "cuda", 0, 0.0, "cpu")),
    # Explicit fractions: two actors share each GPU, the scorer takes 0.5.
    (2, {"actors": 3, "gpus_per_actor": 0.5, "score_gpus": 0.5}, 10, StageResources(3, 0.5, "cuda", 1, 0.5, "cuda")),
    # device: cpu on a GPU cluster keeps every stage off the GPUs.
    (4, {"device": "cpu"}, 10, StageResources(1, 0.0, "cpu", 1, 0.0, "cpu")),
])  # fmt: skip
def test_plan_resources(gpus, fields, units, expected):
    assert plan_resources(gpus, _spec(**fields), units) == expected


@pytest.mark.parametrize("gpus, fields, expected", [
    (2, {"actors": 3, "gpus_per_actor": 1.0}, "need 3.1 GPUs; the cluster has 2"),
    (1, {"gpus_per_actor": 1.0}, "need 1.1 GPUs; the cluster has 1"),
    (0, {"gpus_per_actor": 1.0}, "need 1 GPUs; the cluster has none"),
])  # fmt: skip
def test_too_many_gpus_is_a_user_error(gpus, fields, expected):
    with pytest.raises(UserError, match=expected):
        plan_resources(gpus, _spec(**fields), units=10)
