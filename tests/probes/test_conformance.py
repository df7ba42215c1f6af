"""Conformance suite: every registered probe (read from PROBE_REGISTRY at collection time) must

- declare the facts the engine reads from its class (sampler, role, base reference...), with valid values;
- round-trip its params through canonical JSON and describe every field;
- give the same image for the same seed, and the same image for a row in a batch as alone;
- leave the pipelines it touched (model under test and base) unchanged: weights, scheduler
  class/config, attention processors;
- have its `requires` checked in engine.pipeline.grid.expand_run, before any work.

Rows come from engine.pipeline.grid.expand_rows (so expand_params and work_prompts are exercised) on the
tiny built-in models: `tiny-erased` is the model under test, `tiny` the base. A probe runs with
the shared fast settings below plus its class's `smoke_params`. Requirements other than base_model /
reference_images (made from the base model) are provided by REQUIREMENT_CONTEXTS below (each
returns ProbeContext fields); a probe with a requirement not listed there fails the run checks,
so a new requirement needs its provider here.
"""

from __future__ import annotations

import hashlib
import json
from itertools import groupby
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch

from engine.errors import UserError
from engine.guidance.latent_classifier_io import write_untrained_classifiers
from engine.models.builtin import build_tiny
from engine.models.resolve import resolve_model
from engine.pipeline.grid import ProbeChoice, expand_rows, expand_run
from engine.probe import (
    PROBE_FACTS,
    PROBE_REGISTRY,
    PROBE_ROLES,
    REQUIREMENTS,
    SAMPLERS,
    Probe,
    ProbeBatch,
    ProbeContext,
    describe_params,
    get_probe_class,
    parse_params,
    probes_where,
)
from engine.specs.concepts import available_concepts, load_concept
from engine.specs.runs import RunSpec

PROBES = sorted(PROBE_REGISTRY)
FAST = {"num_inference_steps": 3, "height": 32, "width": 32}
PROVIDED = {"base_model", "reference_images"}
CONCEPTS = ["church", "golf_ball"]
TOLERANCE = 2  # uint8 levels: batched and single-row float math may round differently


def untrained_classifiers(cache_dir: Path) -> dict:
    """The `latent_classifier` requirement: untrained classifiers for every configured concept,
    sized for the tiny model's latents at 32 px, through the context option `classifier_dir`."""
    folder = Path(cache_dir) / "latent-classifiers-32px"
    write_untrained_classifiers(folder, build_tiny(), sorted(available_concepts()), height=32, width=32)
    return {"options": {"classifier_dir": str(folder)}}


REQUIREMENT_CONTEXTS = {"latent_classifier": untrained_classifiers}


def fast_params(name: str) -> dict:
    return {**FAST, **get_probe_class(name).smoke_params}


def brightness_selector(selector, images, concept_name, regions):
    """A deterministic stand-in for engine.scoring's selectors (the probe's machinery is under
    test here, not the selector): mean pixel value of each image."""
    return [float(np.asarray(image, dtype=np.float64).mean()) for image in images]


def pipeline_state(pipe) -> dict:
    """Checksums of every weight, the scheduler's class and config, the attention processors."""
    state = {}
    for part in ("unet", "vae", "text_encoder"):
        digest = hashlib.sha256()
        for name, tensor in getattr(pipe, part).state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        state[part] = digest.hexdigest()
    state["scheduler"] = (type(pipe.scheduler).__name__, json.dumps(dict(pipe.scheduler.config), default=str))
    state["unet_config"] = json.dumps(dict(pipe.unet.config), default=str)
    state["attention"] = {name: (type(p).__name__, id(p)) for name, p in pipe.unet.attn_processors.items()}
    return state


def work_rows(name: str, num_images: int = 1):
    probe_class = get_probe_class(name)
    params = parse_params(name, fast_params(name))
    concepts = {c: load_concept(c) for c in CONCEPTS}
    base = resolve_model("tiny") if "base_model" in probe_class.requires else None
    rows = expand_rows([resolve_model("tiny-erased")], base, concepts, [ProbeChoice(name, params)], num_images)
    return probe_class, rows


class Runs:
    """Each probe's rows run three ways (batch, batch again, one row at a time), once per session."""

    done: ClassVar[dict[str, dict]] = {}

    @classmethod
    def get(cls, name, model_pipe, base_pipe, cache_dir: Path) -> dict:
        if name in cls.done:
            return cls.done[name]
        probe_class, rows = work_rows(name)
        extra_context = {}
        for requirement in sorted(set(probe_class.requires) - PROVIDED):
            assert requirement in REQUIREMENT_CONTEXTS, f"{name} requires {requirement}: add its provider here"
            extra_context.update(REQUIREMENT_CONTEXTS[requirement](cache_dir))
        context = ProbeContext(
            device=torch.device("cpu"),
            base_pipeline=lambda: base_pipe,
            concept=load_concept,
            cache_dir=cache_dir,
            selector_scores=brightness_selector,
            **extra_context,
        )
        before = (pipeline_state(model_pipe), pipeline_state(base_pipe))
        probe = probe_class()
        result = {"rows": rows, "batch": [], "again": [], "single": []}
        for params_json, group in groupby(rows, key=lambda r: r.params):
            group = list(group)
            params = probe_class.params_class.model_validate_json(params_json)
            for key in ("batch", "again"):
                output = probe.run(ProbeBatch(group, params, model_pipe, context))
                assert len(output.images) == len(group)
                result[key].extend(output.images)
            for row in group:
                result["single"].extend(probe.run(ProbeBatch([row], params, model_pipe, context)).images)
        result["state"] = (before, (pipeline_state(model_pipe), pipeline_state(base_pipe)))
        cls.done[name] = result
        return result


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """One thread: on our shared 2-core machines two threads per process oversubscribe the cores
    and make these tiny models several times slower. Restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("probe-cache")


@pytest.mark.parametrize("name", PROBES)
def test_probe_declares_its_facts(name):
    """Every fact is set on the probe's class or an engine base class of probes, never left to
    `Probe` (which declares none), and has a valid value; `smoke_params` are valid params."""
    cls = get_probe_class(name)
    for fact in PROBE_FACTS:
        assert any(fact in vars(k) for k in cls.__mro__ if k is not Probe), f"{name} does not declare {fact}"
    assert cls.sampler in SAMPLERS and cls.role in PROBE_ROLES
    for flag in ("needs_base_reference", "best_of_n", "base_reference", "baseline"):
        assert isinstance(getattr(cls, flag), bool), flag
    assert cls.needs_base_reference == ("reference_images" in cls.requires)
    assert cls.best_of_n == hasattr(cls.params_class, "candidates")
    parse_params(name, {**FAST, **cls.smoke_params})


def test_one_baseline_probe():
    assert len(probes_where(baseline=True)) == 1


@pytest.mark.parametrize("name", PROBES)
def test_params_round_trip_through_json(name):
    probe_class = get_probe_class(name)
    for raw in ({}, fast_params(name)):
        params = parse_params(name, raw)
        assert parse_params(name, json.loads(params.canonical_json())) == params
        assert probe_class.params_class.model_validate_json(params.canonical_json()) == params
        for expanded in probe_class().expand_params(params):
            again = probe_class.params_class.model_validate_json(expanded.canonical_json())
            assert again == expanded
            assert probe_class().expand_params(again) == [again]  # expanding twice changes nothing
    with pytest.raises(UserError, match="unknown key 'no_such_param'"):
        parse_params(name, {"no_such_param": 1})


@pytest.mark.parametrize("name", PROBES)
def test_every_param_is_typed_and_described(name):
    fields = describe_params(get_probe_class(name).params_class)
    assert {f[0] for f in fields} >= {"num_inference_steps", "guidance_scale", "negative_prompt", "height", "width"}
    for field, annotation, default, description in fields:
        assert annotation and default and description, f"{name}.{field} lacks a type, default or description"


@pytest.mark.parametrize("name", PROBES)
def test_same_seed_gives_the_same_image(name, tiny_erased_pipe, tiny_pipe, cache_dir):
    result = Runs.get(name, tiny_erased_pipe, tiny_pipe, cache_dir)
    assert len(result["batch"]) == len(result["rows"]) >= 2
    for first, again in zip(result["batch"], result["again"], strict=False):
        assert first.dtype == np.uint8 and first.shape == (32, 32, 3)
        np.testing.assert_array_equal(first, again)


@pytest.mark.parametrize("name", PROBES)
def test_batch_output_equals_single_row_outputs(name, tiny_erased_pipe, tiny_pipe, cache_dir):
    result = Runs.get(name, tiny_erased_pipe, tiny_pipe, cache_dir)
    for row, batched, single in zip(result["rows"], result["batch"], result["single"], strict=False):
        difference = np.abs(batched.astype(int) - single.astype(int)).max()
        assert difference <= TOLERANCE, f"{name} row {row.prompt!r}/{row.seed} differs by {difference} alone"


@pytest.mark.parametrize("name", PROBES)
def test_shared_components_are_unchanged_after_run(name, tiny_erased_pipe, tiny_pipe, cache_dir):
    (model_before, base_before), (model_after, base_after) = Runs.get(name, tiny_erased_pipe, tiny_pipe, cache_dir)[
        "state"
    ]
    assert model_after == model_before
    assert base_after == base_before


@pytest.mark.parametrize("name", PROBES)
def test_requires_is_checked_before_work(name, tmp_path):
    probe_class = get_probe_class(name)
    assert set(probe_class.requires) <= set(REQUIREMENTS), f"{name} declares an unknown requirement"
    spec = RunSpec(
        output=str(tmp_path / "out"),
        models=["tiny-erased"],
        base_model=str(tmp_path / "no-such-base-model"),
        concepts=CONCEPTS,
        probes=[{"name": name, "params": fast_params(name)}],
        num_images=1,
        # A random tiny CLIP judge where the run spec has judges: a best-of-N probe selecting by CLIP
        # needs one in the run, and no real weights are loaded at planning time anyway.
        **({"judges": ["clip:tiny"]} if "judges" in RunSpec.model_fields else {}),
    )
    # Reference images are made from the base model; every other requirement is missing here.
    unmet = set(probe_class.requires) - {"reference_images"}
    if unmet:
        with pytest.raises(UserError) as error:
            expand_run(spec)
        if unmet == {"base_model"}:
            assert "no-such-base-model" in str(error.value)
    else:  # the base model is neither needed nor resolved
        grid = expand_run(spec)
        assert grid.base is None and grid.rows
    assert not (tmp_path / "out").exists()  # nothing was started
