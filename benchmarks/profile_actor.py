"""Where a probe actor's time goes, against a raw batched diffusers call on the same rows.

    python benchmarks/profile_actor.py                                  # sd14-small, 128x128, CPU
    python benchmarks/profile_actor.py --model tiny --steps 20 --units 4

Runs the actor's own code path in this process (engine.pipeline.stages.ProbeActor: unit JSON ->
rows -> probe -> PNG -> Arrow table) and the raw call (`pipe(prompt=[...], generator=[...])`)
alternately on the same units, then profiles the actor's units with cProfile and prints the time
of each part: UNet, VAE decode, text encoder, scheduler set-up, initial noise, image conversion,
PNG encoding, Arrow conversion. Ray's own share (process hops, the score actor beside it) is what
benchmarks/compare.py measures end to end. Never a test: timings on shared machines are noisy.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import tempfile
import time
from dataclasses import asdict

# Both ways run under the OpenMP wait policy the engine gives its Ray workers (set before torch loads).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from engine.probe import WorkRow, row_generator
from engine.specs.runs import ModelSpec
from probes.standard_prompt import StandardPromptParams

# (label, where the function is defined, function name): cumulative time of each in the profile.
PARTS = [
    ("UNet forward", "unet_2d_condition.py", "forward"),
    ("VAE decode", "autoencoder_kl.py", "decode"),
    ("text encoder", "modeling_clip.py", "forward"),
    ("scheduler set_timesteps", "scheduling_", "set_timesteps"),
    ("scheduler step", "scheduling_", "step"),
    ("initial noise (per-row generators)", "pipeline_stable_diffusion.py", "prepare_latents"),
    ("image postprocess (float -> numpy)", "image_processor.py", "postprocess"),
    ("uint8 conversion", "probe.py", "to_uint8"),
    ("PNG encoding", "results.py", "encode_png"),
    ("Arrow table", "results.py", "rows_table"),
    ("probe.run (all generation)", "standard_prompt.py", "run"),
    ("actor call (everything)", "stages.py", "__call__"),
]


def make_units(count: int, batch_size: int, params_json: str, model: str) -> list[dict[str, str]]:
    units = []
    for u in range(count):
        rows = [WorkRow(f"r{u}-{i}", model, "none", "church", "church", "standard_prompt", params_json,
                        "a picture of a church", u * batch_size + i, 1000 + u * batch_size + i)
                for i in range(batch_size)]
        units.append({"unit": json.dumps([asdict(r) for r in rows])})
    return units


def part_times(stats: pstats.Stats) -> dict[str, float]:
    totals = {label: 0.0 for label, _, _ in PARTS}
    for (filename, _, function), (_, _, _, cumulative, _) in stats.stats.items():
        for label, file_part, name in PARTS:
            if function == name and file_part in filename:
                totals[label] = max(totals[label], cumulative)  # outermost call; recursion counts once
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd14-small")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--units", type=int, default=3, help="units per way (after one warm-up unit each)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores, as the actor)")
    args = parser.parse_args()

    from engine.pipeline.stages import ProbeActor, ProbeStageConfig
    from engine.probe import probe_entry
    from engine.specs.concepts import load_concept

    spec = ModelSpec(name=args.model, pretrained=args.model)
    params = StandardPromptParams(num_inference_steps=args.steps)
    config = ProbeStageConfig(
        models={spec.name: spec}, concepts={"church": load_concept("church")},
        probes={"standard_prompt": probe_entry("standard_prompt")}, device="auto", torch_threads=args.threads,
        cache_dir=tempfile.mkdtemp(),
    )
    actor = ProbeActor(config)
    pipe = actor.runner.cache.pipeline(spec)
    units = make_units(args.units + 1, args.batch_size, params.canonical_json(), spec.name)

    def raw(unit) -> None:
        rows = json.loads(unit["unit"])
        with torch.no_grad():
            pipe(prompt=[r["prompt"] for r in rows], num_inference_steps=args.steps, guidance_scale=7.5,
                 generator=[row_generator(r["seed"]) for r in rows], output_type="np")

    def engine(unit) -> None:
        actor({"unit": [unit["unit"]]})

    raw(units[0])
    engine(units[0])  # warm-up: kernel selection, allocator, prompt cache
    timings = {"raw": 0.0, "engine": 0.0}
    for unit in units[1:]:
        for name, way in (("raw", raw), ("engine", engine)):
            started = time.perf_counter()
            way(unit)
            timings[name] += time.perf_counter() - started
    images = args.units * args.batch_size
    print(f"model {args.model}, {args.steps} steps, batch {args.batch_size}, {images} images per way, "
          f"{torch.get_num_threads()} torch threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    print(f"raw batched pipeline call : {images / timings['raw']:7.3f} images/s")
    print(f"actor (JSON->probe->PNG->Arrow): {images / timings['engine']:7.3f} images/s "
          f"({timings['raw'] / timings['engine']:.2f}x raw)")

    profiler = cProfile.Profile()
    profiler.enable()
    for unit in units[1:]:
        engine(unit)
    profiler.disable()
    totals = part_times(pstats.Stats(profiler))
    whole = totals["actor call (everything)"] or 1.0
    print("\nwhere the actor's time goes (cProfile, cumulative; parts nest inside probe.run):")
    for label, seconds in totals.items():
        print(f"  {label:38s} {seconds:8.3f} s  {100 * seconds / whole:6.1f} %")


if __name__ == "__main__":
    main()
