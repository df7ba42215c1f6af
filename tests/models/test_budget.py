"""The model budget: auto and GB settings, bytes of a module counted once per storage, and
batch_size auto measuring with the budget's unused part kept free."""

from __future__ import annotations

import os

import torch

from engine.models.budget import AUTO_MODEL_MEMORY_FRACTION, GB, model_memory_bytes, module_bytes
from engine.pipeline.batching import AutoBatcher


def test_auto_is_a_fraction_of_the_machine_and_numbers_are_gb():
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert model_memory_bytes("auto", torch.device("cpu")) == int(ram * AUTO_MODEL_MEMORY_FRACTION)
    assert model_memory_bytes(2.5, torch.device("cpu")) == int(2.5 * GB)


def test_tied_weights_count_once():
    layer = torch.nn.Linear(8, 8, bias=False)
    twin = torch.nn.Sequential(layer, torch.nn.Linear(8, 8, bias=False))
    twin[1].weight = layer.weight  # tied, as CLIP's embeddings can be
    assert module_bytes(twin) == 8 * 8 * 4
    assert module_bytes(object()) == 0  # a tokenizer or scheduler holds no tensors


def test_auto_batch_measurement_keeps_the_unused_model_budget_free():
    seen = []

    def measure(pipe, height, width, guidance_scale, reserved_bytes=0):
        seen.append(reserved_bytes)
        return {"batch_size": 2}

    held = {"bytes": 3 * GB}
    batcher = AutoBatcher(True, torch.device("cuda"), measure=measure,
                          reserved_bytes=lambda: 10 * GB - held["bytes"])
    assert [len(b) for b in batcher.split(list(range(5)), "m", None, {})] == [2, 2, 1]
    held["bytes"] = 8 * GB
    batcher.split([1], "other", None, {})
    assert seen == [7 * GB, 2 * GB]
