"""The model cache at scale, on CPU: 21 distinct full pipelines saved to folders (three families of
seven that share a text encoder and VAE, each model its own UNet) through one probe runner whose
byte budget holds three of them. The cache never holds more than the budget, every row lands,
each family's text encoder and VAE load once; without sharing every model loads all three."""

from __future__ import annotations

import pytest
import torch

from engine.errors import UserError
from engine.models.budget import GB, module_bytes
from engine.models.cache import ModelCache
from engine.models.resolve import resolve_model
from engine.pipeline.grid import expand_run, work_units
from engine.pipeline.stages import ProbeRunner, ProbeStageConfig
from engine.specs.runs import run_spec_from_dict

FAMILIES = 3
MODELS_PER_FAMILY = 7


def _small_pipeline(family: int, member: int):
    """A tiny-shaped pipeline: text encoder and VAE from the family's seed, UNet from the model's."""
    from engine.models.builtin import build_tiny

    shared = build_tiny(seed=1000 + family)
    own = build_tiny(seed=100 * family + member)
    return type(shared)(**{**shared.components, "unet": own.unet})


@pytest.fixture(scope="module")
def model_grid(tmp_path_factory):
    """Folders of 21 distinct pipelines, family-major (units run in model order)."""
    root = tmp_path_factory.mktemp("scale-grid")
    folders = []
    for family in range(FAMILIES):
        for member in range(MODELS_PER_FAMILY):
            folder = root / f"f{family}-m{member}"
            _small_pipeline(family, member).save_pretrained(folder, safe_serialization=True)
            folders.append(folder)
    return folders


def _full_bytes(pipe) -> int:
    return sum(module_bytes(getattr(pipe, name)) for name in ("unet", "vae", "text_encoder"))


def _grid(tmp_path, folders, budget_gb: float):
    spec = run_spec_from_dict({
        "output": str(tmp_path / "out"), "models": [str(f) for f in folders], "concepts": ["church"],
        "num_images": 1, "probes": [{"name": "standard_prompt", "params": {
            "num_inference_steps": 1, "height": 32, "width": 32}}],
        "judges": [], "batch_size": 1, "model_memory": budget_gb, "device": "cpu",
    })  # fmt: skip
    return expand_run(spec)


def test_twenty_one_pipelines_through_one_actor_under_a_budget_of_three(model_grid, tmp_path):
    full = _full_bytes(_small_pipeline(0, 0))
    budget = 3 * full
    grid = _grid(tmp_path, model_grid, budget / GB)
    runner = ProbeRunner(ProbeStageConfig.from_grid(grid, "cpu", "sdpa", 1, str(tmp_path / "cache")))
    assert runner.cache.memory_budget == budget
    records, failures, held = [], [], []
    for unit in work_units(grid.rows, grid.spec.batch_size):
        outcome = runner.generate(unit)
        records += outcome.records
        failures += outcome.failures
        held.append(runner.cache.held_bytes())
    stats = runner.cache.stats
    assert not failures
    assert sorted(r["row_id"] for r in records) == sorted(r.row_id for r in grid.rows)  # every row, once
    assert len({r["model"] for r in records}) == FAMILIES * MODELS_PER_FAMILY
    assert max(held) <= budget and stats.peak_bytes <= budget
    assert stats.loads == FAMILIES * MODELS_PER_FAMILY  # model order: each model loads once
    assert stats.evictions >= stats.loads - 3 - MODELS_PER_FAMILY  # the budget really bounded the cache
    # Each family's text encoder and VAE loaded once, the tokenizer (the same files in every
    # folder) once for all; every UNet once.
    counts = runner.cache.component_load_counts
    assert set(counts.values()) == {1}
    assert stats.component_loads == FAMILIES * 2 + 1 + FAMILIES * MODELS_PER_FAMILY
    assert stats.components_shared == 4 * FAMILIES * MODELS_PER_FAMILY - stats.component_loads


def test_sharing_holds_more_models_in_the_same_budget(model_grid):
    full = _full_bytes(_small_pipeline(0, 0))
    shared = ModelCache(torch.device("cpu"), memory_budget=4 * full)
    alone = ModelCache(torch.device("cpu"), memory_budget=4 * full, share=False)
    for folder in model_grid[:MODELS_PER_FAMILY]:
        spec = resolve_model(str(folder))
        for cache in (shared, alone):
            cache.pipeline(spec)
            assert cache.held_bytes() <= 4 * full
    assert len(alone.held_models()) == 4
    assert len(shared.held_models()) > 4  # one text encoder and VAE for all: only UNets add up
    assert alone.stats.component_loads == 4 * MODELS_PER_FAMILY
    assert shared.stats.component_loads == 3 + MODELS_PER_FAMILY  # text encoder, VAE, tokenizer once
    # Shared components are the very same modules; each model keeps its own UNet.
    last_two = model_grid[MODELS_PER_FAMILY - 2 : MODELS_PER_FAMILY]
    first, second = (shared.pipeline(resolve_model(str(f))) for f in last_two)
    assert first.text_encoder is second.text_encoder and first.vae is second.vae
    assert first.unet is not second.unet


def test_an_evicted_pipeline_is_loaded_again_and_its_memory_released(model_grid):
    full = _full_bytes(_small_pipeline(0, 0))
    cache = ModelCache(torch.device("cpu"), memory_budget=full, share=False)
    specs = [resolve_model(str(f)) for f in (model_grid[0], model_grid[MODELS_PER_FAMILY])]
    import weakref

    first = weakref.ref(cache.pipeline(specs[0]).unet)
    cache.pipeline(specs[1])
    assert cache.held_models() == [specs[1].name] and cache.stats.evictions == 1
    assert first() is None  # dropped, not merely forgotten
    cache.pipeline(specs[0])
    assert cache.stats.loads == 3 and cache.held_bytes() <= full


def test_a_budget_smaller_than_one_model_is_refused(model_grid):
    cache = ModelCache(torch.device("cpu"), memory_budget=1000)
    with pytest.raises(UserError, match="model_memory"):
        cache.pipeline(resolve_model(str(model_grid[0])))
