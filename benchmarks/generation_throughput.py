"""Images/s of batched generation (the engine's standard_prompt) against the original's code path
(one pipeline call per image), measured in one process, one after the other.

    python benchmarks/generation_throughput.py                      # tiny model, CPU
    python benchmarks/generation_throughput.py --model sd14-random --steps 50 --batch-size 16   # GPU

On CUDA the pipeline runs in fp16 with SDPA attention (the engine's defaults). Prints a table and
the speed-up ratio; never used as a test (timings on shared machines are noisy).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from engine.models.cache import ModelCache
from engine.models.loading import resolve_device
from engine.probe import ProbeBatch, ProbeContext, WorkRow, row_generator
from engine.specs.runs import ModelSpec
from probes.standard_prompt import StandardPromptParams, StandardPromptProbe


def rows(count: int) -> list[WorkRow]:
    return [WorkRow(f"r{i}", "m", "none", "church", "church", "standard_prompt", "{}", "a picture of a church",
                    i, 1000 + i) for i in range(count)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--attention", default="sdpa", choices=["sdpa", "xformers"])
    args = parser.parse_args()

    device = resolve_device("auto")
    pipe = ModelCache(device, args.attention).pipeline(ModelSpec(name=args.model, pretrained=args.model))
    params = StandardPromptParams(num_inference_steps=args.steps)
    context = ProbeContext(device, lambda: pipe, lambda name: None, Path("/tmp"))
    probe = StandardPromptProbe()
    work = rows(args.images)

    # Warm-up (kernel selection, allocator) for both paths.
    pipe("warm up", generator=row_generator(0), num_inference_steps=2, output_type="np")
    probe.run(ProbeBatch(work[: args.batch_size], params.model_copy(update={"num_inference_steps": 2}), pipe, context))

    sync(device)
    start = time.perf_counter()
    for row in work:  # the original: one image per call
        pipe(row.prompt, generator=row_generator(row.seed), num_inference_steps=args.steps, output_type="np")
    sync(device)
    single = time.perf_counter() - start

    start = time.perf_counter()
    for offset in range(0, len(work), args.batch_size):
        probe.run(ProbeBatch(work[offset : offset + args.batch_size], params, pipe, context))
    sync(device)
    batched = time.perf_counter() - start

    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"model {args.model}, {args.steps} steps, {args.images} images, device {name}, dtype {pipe.unet.dtype}")
    print(f"one call per image : {args.images / single:8.2f} images/s")
    print(f"batched ({args.batch_size:3d})      : {args.images / batched:8.2f} images/s")
    print(f"speed-up           : {single / batched:8.2f}x")


if __name__ == "__main__":
    main()
