"""How many bytes of models a probe actor may hold (`model_memory`), and what a loaded component costs.

`model_memory: auto` is AUTO_MODEL_MEMORY_FRACTION of the device's total memory (a GPU's, or the
machine's RAM on CPU); the rest is the probe's working set: its batches' activations, the VAE
decode, the scoring actor's share of the GPU. A number is that many GB (10^9 bytes). The cache
evicts whole pipelines, least recently used first, to stay under it (engine.models.cache), and
`batch_size: auto` measures its batch with the part of the budget not yet used kept free
(engine.pipeline.batching).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

GB = 10**9
AUTO_MODEL_MEMORY_FRACTION = 0.6


def device_memory(device: torch.device) -> int:
    """Total bytes of the device: the GPU's memory, or this machine's RAM on CPU."""
    if device.type == "cuda":
        import torch

        return int(torch.cuda.get_device_properties(device).total_memory)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def model_memory_bytes(setting: float | str, device: torch.device) -> int:
    """The byte budget for `model_memory` on `device`."""
    if setting == "auto":
        return int(device_memory(device) * AUTO_MODEL_MEMORY_FRACTION)
    return int(float(setting) * GB)


def module_bytes(module) -> int:
    """Bytes of a module's parameters and buffers, each storage counted once (tied weights); 0 for
    objects without tensors (a tokenizer, a scheduler)."""
    if not hasattr(module, "parameters"):
        return 0
    seen: dict[tuple, int] = {}
    tensors = [*module.parameters(), *module.buffers()]
    for tensor in tensors:
        storage = tensor.untyped_storage()
        seen[(tensor.device.type, storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


def format_bytes(count: float) -> str:
    for unit, size in (("GB", GB), ("MB", 10**6), ("kB", 10**3)):
        if abs(count) >= size:
            return f"{count / size:.2f} {unit}" if unit == "GB" else f"{count / size:.1f} {unit}"
    return f"{int(count)} B"
