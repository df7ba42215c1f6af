"""The engine against the original's way and raw batched diffusers, on the same work, in one run.

    python benchmarks/compare.py                      # CPU: sd14-small (SD 1.4 layout, 16x16 latents)
    python benchmarks/compare.py --preset cuda        # GPU: sd14-random (full SD 1.4), 512x512
    python benchmarks/compare.py --images 16 --steps 20 --skip-engine-sweep   # a quicker CPU look

Same model, prompts, seeds and settings for every way: the concept `church`'s first N sampled
(prompt, seed) rows, PNDM as SD 1.4 ships it, 50 steps, CFG 7.5.

standard_prompt:
- original: one pipeline call per image (the original's loop), on --original-images of the rows;
- raw batched: one diffusers call per batch of rows, at the best of --batch-sizes (each tried
  briefly first), one CPU generator per row;
- engine steady state: `engine run` at that batch size, timed inside its probe actor (the rows'
  generation_seconds: each unit's time, shared by its rows), Ray's stream around it: batch size /
  the median unit's time (the first unit also pays one-time kernel set-up), and images / all units;
- engine wall clock: the same `engine run` as a subprocess, from spawn to exit (Python start,
  imports, Ray, actor start, model build, generation, parquet, shut-down).
noise_based sweep (6 eta x 4 v = 24 candidates per prompt):
- one call per candidate (the original's sweep) against the batched sweep (NoiseBasedProbe.run,
  candidate_batch_size at a time), in this process; and `engine run` of the sweep end to end.
Also: how long `engine run` takes to reject a misspelled concept.

On CUDA it prints the fraction of the physical limit: the full SD 1.4 architecture costs about
84.5 TFLOP per 512x512 image with PNDM-50 and CFG (51 UNet calls x 2 x 803.3 GFLOP, VAE decode
2.51 TFLOP, text 0.03 TFLOP); an H100/H200 does 989 dense fp16 TFLOPS, so about 11.7 images/s.

Both ways in this process use the OpenMP wait policy the engine gives its Ray workers
(engine.pipeline.ray_start). Each `engine run` sits between two runs of the in-process way it is
compared with; every way keeps its best time (load from other processes only ever slows a
measurement down); --repeats adds rounds of the in-process ways, --engine-runs more `engine run`s
of standard_prompt (the best run, by its median unit, is the one reported). Never a test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from statistics import median

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads, as in the engine's workers
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from engine.models.cache import ModelCache
from engine.models.loading import resolve_device
from engine.probe import ProbeBatch, ProbeContext, WorkRow, row_generator
from engine.specs.concepts import load_concept
from engine.specs.runs import ModelSpec
from probes.noise_based import NoiseBasedParams, NoiseBasedProbe

ROOT = Path(__file__).resolve().parent.parent
PRESETS = {
    "cpu": {"model": "sd14-small", "images": 48, "batch_sizes": "4,8,16", "original_images": 16,
            "sweep_prompts": 1, "candidate_batch_size": 24},
    "cuda": {"model": "sd14-random", "images": 64, "batch_sizes": "8,16,32", "original_images": 8,
             "sweep_prompts": 1, "candidate_batch_size": 24},
}
SD14_UNET_GFLOP = 803.3  # one UNet forward, batch 1, 64x64 latent
SD14_VAE_DECODE_GFLOP = 2514.5
SD14_TEXT_GFLOP = 13.3
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense fp16/bf16


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def work_rows(count: int) -> list[WorkRow]:
    concept = load_concept("church")
    return [WorkRow(f"r{i}", "m", "none", "church", "church", "standard_prompt", "{}", prompt, index, seed)
            for i, (index, prompt, seed) in enumerate(concept.sample_prompts(count))]


def timed(device, fn) -> float:
    sync(device)
    started = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - started


def engine_command(args, probe: str, images: int, output: Path, batch_size: str, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "engine.cli", "run", "--model", args.model, "--concept", "church",
            "--probe", probe, "--num-images", str(images), "--output", str(output), "--set", f"batch_size={batch_size}",
            "--probe-param", f"{probe}.num_inference_steps={args.steps}", *extra]


def run_engine(command: list[str]) -> tuple[float, list[tuple[int, float]], dict]:
    """(wall seconds, [(rows, seconds)] per unit, manifest) of one `engine run` subprocess."""
    from engine.results import read_manifest, read_rows

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    started = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"engine run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    output = Path(command[command.index("--output") + 1])
    # A unit's rows share its time equally, so equal generation_seconds values are one unit.
    shares = Counter(read_rows(output, columns=["generation_seconds"]).column("generation_seconds").to_pylist())
    units = [(count, share * count) for share, count in shares.items()]
    return wall, units, read_manifest(output)


def bad_concept_seconds() -> float:
    command = [sys.executable, "-m", "engine.cli", "run", "--model", "tiny", "--concept", "nope", "--probe",
               "standard_prompt", "--num-images", "1", "--output", tempfile.mkdtemp()]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    started = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 2 or "unknown concept" not in done.stderr:
        raise RuntimeError(f"expected a one-line concept error, got {done.returncode}: {done.stderr[-500:]}")
    return seconds


def physical_limit(device: torch.device, pipe, steps: int, model: str) -> tuple[float, str] | None:
    """(images/s at the GPU's dense fp16 peak, GPU name) for the full SD 1.4 architecture at 512 px."""
    if device.type != "cuda" or model != "sd14-random":
        return None
    name = torch.cuda.get_device_name(device)
    peak = next((tflops for key, tflops in PEAK_TFLOPS.items() if key in name), None)
    if peak is None:
        return None
    pipe.scheduler.set_timesteps(steps)
    unet_calls = len(pipe.scheduler.timesteps)
    tflop = (unet_calls * 2 * SD14_UNET_GFLOP + SD14_VAE_DECODE_GFLOP + 2 * SD14_TEXT_GFLOP) / 1000
    return peak / tflop, f"{name}: {peak:g} TFLOPS / {tflop:.1f} TFLOP per image"


def line(label: str, rate: float, unit: str, note: str = "") -> None:
    print(f"  {label:54s} {rate:8.3f} {unit:12s} {note}".rstrip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: cuda if available")
    parser.add_argument("--model", default=None)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--images", type=int, default=None, help="standard_prompt images per way")
    parser.add_argument("--original-images", type=int, default=None, help="images of the one-call-per-image way")
    parser.add_argument("--batch-sizes", default=None, help="raw batch sizes tried, comma-separated")
    parser.add_argument("--sweep-prompts", type=int, default=None, help="noise_based prompts (24 candidates each)")
    parser.add_argument("--candidate-batch-size", type=int, default=None)
    parser.add_argument("--engine-batch-size", default=None, help="engine run's batch_size (default: raw's best)")
    parser.add_argument("--repeats", type=int, default=1, help="alternating rounds of the in-process ways")
    parser.add_argument("--engine-runs", type=int, default=1,
                        help="`engine run`s of standard_prompt, each between two raw runs; the best counts")
    parser.add_argument("--skip-engine-sweep", action="store_true", help="no `engine run` of the noise sweep")
    args = parser.parse_args()
    device = resolve_device("auto")
    preset = PRESETS[args.preset or ("cuda" if device.type == "cuda" else "cpu")]
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    load = os.getloadavg()

    pipe = ModelCache(device).pipeline(ModelSpec(name=args.model, pretrained=args.model))
    rows = work_rows(args.images)
    kwargs = {"num_inference_steps": args.steps, "guidance_scale": 7.5, "output_type": "np"}

    def raw_batched(batch_size: int, chosen: list[WorkRow], steps: int = args.steps):
        for start in range(0, len(chosen), batch_size):
            part = chosen[start : start + batch_size]
            with torch.no_grad():
                pipe(prompt=[r.prompt for r in part], generator=[row_generator(r.seed) for r in part],
                     **{**kwargs, "num_inference_steps": steps})

    def original(chosen: list[WorkRow]):
        for row in chosen:
            with torch.no_grad():
                pipe(row.prompt, generator=row_generator(row.seed), **kwargs)

    # Warm-up and batch-size choice: each size on two batches at a fifth of the steps.
    raw_batched(1, rows[:1], 2)
    trial_steps = max(2, args.steps // 5)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    trial = {b: 2 * b / timed(device, lambda b=b: raw_batched(b, rows[: 2 * b], trial_steps)) for b in sizes}
    best = max(trial, key=trial.get)

    # Noise sweep, in this process (a stand-in selector: only generation is timed).
    probe = NoiseBasedProbe()
    context = ProbeContext(device, lambda: pipe, lambda name: None, Path(tempfile.mkdtemp()),
                           selector_scores=lambda s, images, c, r: [0.0] * len(images))
    sweep = NoiseBasedParams(num_inference_steps=args.steps, candidate_batch_size=args.candidate_batch_size)
    singles = probe.expand_params(sweep.model_copy(update={"keep_all_candidates": True}))
    sweep_rows = work_rows(args.sweep_prompts)
    candidates = len(sweep_rows) * len(singles)
    warm = {"num_inference_steps": 2}
    probe.run(ProbeBatch(sweep_rows[:1], sweep.model_copy(update=warm), pipe, context))
    probe.run(ProbeBatch(sweep_rows[:1], singles[0].model_copy(update=warm), pipe, context))

    def one_call_per_candidate():
        for row in sweep_rows:
            for params in singles:
                probe.run(ProbeBatch([row], params, pipe, context))

    ways = {
        "original": lambda: original(rows[: args.original_images]),
        "raw": lambda: raw_batched(best, rows),
        "sweep_single": one_call_per_candidate,
        "sweep_batched": lambda: probe.run(ProbeBatch(sweep_rows, sweep, pipe, context)),
    }
    best_time = {name: float("inf") for name in ways}

    def measure(name: str) -> None:
        best_time[name] = min(best_time[name], timed(device, ways[name]))

    def engine_run():
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the engine's auto batch size sees the GPU's free memory
        with tempfile.TemporaryDirectory() as folder:
            return run_engine(engine_command(args, "standard_prompt", args.images, Path(folder) / "run",
                                             engine_batch, ["--set", "judges=[]"]))

    def engine_sweep_run():
        with tempfile.TemporaryDirectory() as folder:
            return run_engine(engine_command(
                args, "noise_based", args.sweep_prompts, Path(folder) / "sweep", "1",
                ["--set", "judges=[clip:tiny]",
                 "--probe-param", f"noise_based.candidate_batch_size={args.candidate_batch_size}"]))

    # Each engine run sits between two runs of the way it is compared with (the best of them
    # counts), so a change of the machine's load during the run shows on both sides.
    engine_batch = args.engine_batch_size or str(best)
    engines, engine_sweep = [], None
    for round_ in range(max(args.repeats, args.engine_runs)):
        if round_ < args.repeats:
            measure("original")
        measure("raw")
        if round_ < args.engine_runs:  # each run is a fresh process: its start-up is part of what it measures
            engines.append(engine_run())
            measure("raw")
        if round_ >= args.repeats:
            continue
        measure("sweep_single")
        measure("sweep_batched")
        if round_ == 0 and not args.skip_engine_sweep:
            engine_sweep = engine_sweep_run()
            measure("sweep_single")
    rejected = bad_concept_seconds()

    original_rate = args.original_images / best_time["original"]
    raw_rate = args.images / best_time["raw"]
    # Every way keeps its best: the engine's best run by its median unit (start-up is in every run).
    steadies = [median(rows / seconds for rows, seconds in units) for _, units, _ in engines]
    wall, units, manifest = engines[steadies.index(max(steadies))]
    steady = max(steadies)
    all_units = args.images / sum(seconds for _, seconds in units)
    wall_rate = args.images / wall
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device {name}, dtype {pipe.unet.dtype}, model {args.model}, {args.steps} steps, CFG 7.5, "
          f"load average {load[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end, OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY')}")
    print(f"batch sizes tried ({trial_steps} steps, images/s scaled to {args.steps}): "
          + ", ".join(f"{b}: {r * trial_steps / args.steps:.2f}" for b, r in trial.items()))
    print(f"\nstandard_prompt, {args.images} images")
    line(f"original (one call per image, {args.original_images} images)", original_rate, "images/s")
    line(f"raw batched diffusers (batch {best})", raw_rate, "images/s", f"{raw_rate / original_rate:5.2f}x original")
    line(f"engine steady state (batch {engine_batch}, median unit)", steady, "images/s",
         f"{steady / raw_rate:5.2f}x raw batched, {steady / original_rate:5.2f}x original")
    line(f"engine, all {len(units)} units' generation time", all_units, "images/s",
         f"{all_units / raw_rate:5.2f}x raw batched")
    line(f"engine run wall clock ({wall:.1f} s, start-up included)", wall_rate, "images/s",
         f"{wall_rate / raw_rate:5.2f}x raw batched, {wall_rate / original_rate:5.2f}x original")
    if len(engines) > 1:
        print(f"  engine runs' median units (images/s): {', '.join(f'{rate:.3f}' for rate in steadies)}; "
              f"wall clocks (s): {', '.join(f'{w:.1f}' for w, _, _ in engines)}")
    print(f"  engine batching: {json.dumps(manifest.get('batching'))}")
    limit = physical_limit(device, pipe, args.steps, args.model)
    if limit:
        ceiling, basis = limit
        print(f"  physical limit {ceiling:.2f} images/s ({basis}): raw {raw_rate / ceiling:.1%}, "
              f"engine steady state {steady / ceiling:.1%}")
    print(f"\nnoise_based sweep, {len(sweep_rows)} prompt(s) x {len(singles)} candidates")
    single_rate = candidates / best_time["sweep_single"]
    batched_rate = candidates / best_time["sweep_batched"]
    line("one call per candidate (the original's sweep)", single_rate, "candidates/s")
    line(f"batched sweep (candidate_batch_size {args.candidate_batch_size})", batched_rate, "candidates/s",
         f"{batched_rate / single_rate:5.2f}x one call per candidate")
    if engine_sweep:
        sweep_wall, sweep_units, _ = engine_sweep
        in_actor = candidates / sum(seconds for _, seconds in sweep_units)
        line("engine run of the sweep, in its probe actor", in_actor, "candidates/s",
             f"{in_actor / single_rate:5.2f}x one call per candidate")
        line(f"engine run of the sweep, wall clock ({sweep_wall:.1f} s)", candidates / sweep_wall, "candidates/s")
    print(f"\nmisspelled concept rejected by `engine run` in {rejected:.2f} s")


if __name__ == "__main__":
    main()
