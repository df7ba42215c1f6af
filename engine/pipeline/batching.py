"""How many rows one probe call takes: the run's `batch_size`, an integer or `auto`.

- An integer: the driver cuts units of that many rows. Units are fixed before any actor starts, so
  the same command batches the same rows together and reruns give byte-identical images.
- `auto` on CPU: CPU_AUTO_BATCH_SIZE rows per unit, nothing measured (the CPU is filled by a few
  rows; more only delays the first rows).
- `auto` on CUDA: the driver cuts units of AUTO_UNIT_ROWS rows, and each probe actor measures once
  per (model, image size, CFG) the largest batch its GPU's free memory holds: a one-step
  generation of the model (UNet at the CFG batch, VAE decode) at 1, 2, 4, ... rows, stopping
  before the peak memory, extrapolated linearly from the last two sizes, would pass
  AUTO_MEMORY_FRACTION of the free memory less the model cache's unused budget (`model_memory`:
  models the actor may still load), or at an out-of-memory error, or AUTO_MAX_BATCH.
  Units are run in sub-batches of that size. Best-of-N probes bound their UNet batch by their own
  `candidate_batch_size`; for them the size only sets how many rows share a call. Each measurement
  goes to the run's log and into the manifest (`batching`); set `batch_size` to the recorded value
  to pin it (an auto size can differ between GPUs, and with it a row's last bits).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

CPU_AUTO_BATCH_SIZE = 4
AUTO_UNIT_ROWS = 64
AUTO_MAX_BATCH = 64
AUTO_MEMORY_FRACTION = 0.85  # the rest: allocator fragmentation, the score actor, the probe's extras

Row = TypeVar("Row")


def unit_rows(batch_size: int | str, on_gpu: bool) -> int:
    """Rows per unit the driver cuts."""
    if batch_size != "auto":
        return int(batch_size)
    return AUTO_UNIT_ROWS if on_gpu else CPU_AUTO_BATCH_SIZE


def largest_fitting_batch(
    try_batch: Callable[[int], int],
    budget: int,
    cap: int = AUTO_MAX_BATCH,
    out_of_memory: tuple[type[BaseException], ...] = (MemoryError,),
) -> tuple[int, dict[int, int]]:
    """The largest power of two <= cap whose `try_batch(n)` (peak bytes of n rows) stays within
    `budget`; sizes are tried doubling from 1, and the next one is skipped when its peak,
    extrapolated from the last two, would not fit. Returns (size, {n: peak bytes} of the tries);
    1 when even one row does not fit (nothing smaller exists)."""
    peaks: dict[int, int] = {}
    size = 1
    while True:
        try:
            peaks[size] = int(try_batch(size))
        except out_of_memory:
            break
        if peaks[size] > budget or size * 2 > cap:
            break
        tried = sorted(peaks)
        if len(tried) >= 2:
            previous = tried[-2]
            per_row = (peaks[size] - peaks[previous]) / (size - previous)
        else:
            per_row = peaks[size]  # one point: assume everything grows with the rows
        if peaks[size] + per_row * size > budget:
            break
        size *= 2
    fitting = [n for n, peak in peaks.items() if peak <= budget]
    return max(fitting, default=1), peaks


def measure_cuda_batch(pipe, height: int | None, width: int | None, guidance_scale: float,
                       reserved_bytes: int = 0) -> dict[str, Any]:
    """largest_fitting_batch for `pipe` on its CUDA device (one-step generations, uncompiled UNet),
    with `reserved_bytes` (the model cache's unused budget: models it may still load) kept free."""
    import torch

    device = pipe.device
    compiled = pipe.unet
    pipe.unet = getattr(compiled, "_orig_mod", compiled)  # no compilation per tried batch size
    try:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(device)
        budget = int(max(0, free - reserved_bytes) * AUTO_MEMORY_FRACTION)

        def try_batch(rows: int) -> int:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            with torch.no_grad():
                pipe(prompt=["batch size probe"] * rows, num_inference_steps=1, guidance_scale=guidance_scale,
                     height=height, width=width, output_type="np")
            torch.cuda.synchronize(device)
            return torch.cuda.max_memory_allocated(device) - before

        size, peaks = largest_fitting_batch(try_batch, budget, out_of_memory=(torch.cuda.OutOfMemoryError,))
    finally:
        pipe.unet = compiled
        torch.cuda.empty_cache()
    return {"batch_size": size, "free_bytes": int(free), "total_bytes": int(total), "budget_bytes": budget,
            "reserved_for_models_bytes": int(reserved_bytes),
            "peak_bytes": {str(n): p for n, p in sorted(peaks.items())}, "gpu": torch.cuda.get_device_name(device)}


class AutoBatcher:
    """In a probe actor: splits units into batches of the measured size (`auto` on CUDA only;
    otherwise a unit is one batch). `on_measured` receives each measurement's record."""

    def __init__(self, enabled: bool, device, on_measured: Callable[[dict[str, Any]], None] | None = None,
                 measure: Callable[..., dict[str, Any]] = measure_cuda_batch,
                 reserved_bytes: Callable[[], int] | None = None):
        self.enabled = enabled and device.type == "cuda"
        self.reserved_bytes = reserved_bytes
        self.on_measured = on_measured
        self.measure = measure
        self.sizes: dict[tuple, int] = {}

    def split(self, rows: Sequence[Row], model: str, pipe, params: dict[str, Any]) -> list[list[Row]]:
        if not self.enabled:
            return [list(rows)]
        settings = (params.get("height"), params.get("width"), float(params.get("guidance_scale", 7.5)))
        key = (model, *settings)
        if key not in self.sizes:
            extra = {"reserved_bytes": self.reserved_bytes()} if self.reserved_bytes is not None else {}
            record = self.measure(pipe, *settings, **extra)
            self.sizes[key] = max(1, int(record["batch_size"]))
            logger.info("auto batch size for %s at %s: %d", model, settings, self.sizes[key])
            if self.on_measured is not None:
                height, width, guidance_scale = settings
                self.on_measured({"model": model, "height": height, "width": width, "guidance_scale": guidance_scale,
                                  "actor_pid": os.getpid(), **record})
        size = self.sizes[key]
        return [list(rows[start : start + size]) for start in range(0, len(rows), size)]


def batching_record(batch_size: int | str, on_gpu: bool, measured: list[dict[str, Any]]) -> dict[str, Any]:
    """The manifest's `batching` entry: what was asked, the driver's unit size, the actors' measurements."""
    record: dict[str, Any] = {"batch_size": batch_size, "unit_rows": unit_rows(batch_size, on_gpu)}
    if batch_size == "auto":
        record["measured"] = list(measured)
    return record
