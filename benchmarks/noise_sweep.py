"""Candidates/s of the noise_based sweep: candidates batched through engine.sampling against one
call per candidate (the original's path: one pipeline call per (eta, v) variant), measured in one
process, one after the other, on the same pipeline.

    python benchmarks/noise_sweep.py                                        # tiny model, CPU
    python benchmarks/noise_sweep.py --model sd14-random --steps 50 --candidate-batch-size 24   # GPU

Both paths run NoiseBasedProbe.run: batched = the full sweep (default 6 eta x 4 v = 24 candidates
per prompt) in chunks of --candidate-batch-size; per candidate = each single-candidate params of
keep_all_candidates, one prompt at a time. Selection uses a constant stand-in selector, so only
generation is timed. The two paths alternate --repeats times and each keeps its best time.
Prints a table and the ratio; never a test (shared machines are noisy).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from engine.models.cache import ModelCache
from engine.models.loading import resolve_device
from engine.probe import ProbeBatch, ProbeContext, WorkRow
from engine.specs.runs import ModelSpec
from probes.noise_based import NoiseBasedParams, NoiseBasedProbe


def rows(count: int) -> list[WorkRow]:
    return [
        WorkRow(f"r{i}", "m", "none", "church", "church", "noise_based", "{}", "a picture of a church", i, 1000 + i)
        for i in range(count)
    ]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--prompts", type=int, default=1, help="rows; each gets the whole sweep")
    parser.add_argument("--candidate-batch-size", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3, help="alternating repetitions; the best of each counts")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = resolve_device("auto")
    pipe = ModelCache(device).pipeline(ModelSpec(name=args.model, pretrained=args.model))
    context = ProbeContext(
        device,
        lambda: pipe,
        lambda name: None,
        Path("/tmp"),
        selector_scores=lambda s, images, c, r: [0.0] * len(images),
    )
    probe = NoiseBasedProbe()
    sweep = NoiseBasedParams(num_inference_steps=args.steps, candidate_batch_size=args.candidate_batch_size)
    singles = probe.expand_params(sweep.model_copy(update={"keep_all_candidates": True}))
    work = rows(args.prompts)
    candidates = len(work) * len(singles)

    # Warm-up (kernel selection, allocator) for both batch shapes.
    warm = {"num_inference_steps": 2}
    probe.run(ProbeBatch(work[:1], sweep.model_copy(update=warm), pipe, context))
    probe.run(ProbeBatch(work[:1], singles[0].model_copy(update=warm), pipe, context))

    def one_call_per_candidate() -> None:  # the original: one call per candidate
        for row in work:
            for params in singles:
                probe.run(ProbeBatch([row], params, pipe, context))

    def batched_sweep() -> None:  # every row's candidates, chunked
        probe.run(ProbeBatch(work, sweep, pipe, context))

    # Alternate the two paths and keep each one's best time: load from other processes on a shared
    # machine only ever slows a measurement down.
    timings: dict[str, list[float]] = {"single": [], "batched": []}
    for _ in range(args.repeats):
        for key, path in (("single", one_call_per_candidate), ("batched", batched_sweep)):
            sync(device)
            start = time.perf_counter()
            path()
            sync(device)
            timings[key].append(time.perf_counter() - start)
    single, batched = min(timings["single"]), min(timings["batched"])

    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(
        f"model {args.model}, {args.steps} steps, {len(work)} prompts x {len(singles)} candidates, "
        f"device {name}, dtype {pipe.unet.dtype}"
    )
    print(f"one call per candidate : {candidates / single:8.2f} candidates/s")
    print(f"batched ({args.candidate_batch_size:3d})          : {candidates / batched:8.2f} candidates/s")
    print(f"ratio                  : {single / batched:8.2f}x")


if __name__ == "__main__":
    main()
