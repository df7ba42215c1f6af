"""Loads and peak model memory of the model cache walking a grid of distinct pipelines, with and
without sharing components by content.

    python benchmarks/model_cache.py                       # the CPU scale test's grid: 21 pipelines
    python benchmarks/model_cache.py --families 4 --per-family 10 --budget-models 3

The grid is the scale test's (tests/models/test_model_cache_scale.py): FAMILIES x PER_FAMILY tiny
pipelines saved to folders, a family sharing its text encoder and VAE, every model its own UNet;
the models are visited in order (as an actor walks its slice), then the first one again. For each
budget (`--budget-models` full pipelines, and unbounded) and each way (sharing, not sharing) it
prints pipelines loaded, components loaded, evictions, pipelines held at the end and the peak
bytes the cache held, plus the process's peak resident memory growth measured in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from engine.models.budget import module_bytes
from engine.models.cache import ModelCache
from engine.models.resolve import resolve_model


def small_pipeline(family: int, member: int):
    from engine.models.builtin import build_tiny

    shared = build_tiny(seed=1000 + family)
    own = build_tiny(seed=100 * family + member)
    return type(shared)(**{**shared.components, "unet": own.unet})


def build_grid(root: Path, families: int, per_family: int) -> list[Path]:
    folders = []
    for family in range(families):
        for member in range(per_family):
            folder = root / f"f{family}-m{member}"
            if not folder.exists():
                small_pipeline(family, member).save_pretrained(folder, safe_serialization=True)
            folders.append(folder)
    return folders


def walk(folders: list[str], budget: int | None, share: bool) -> dict:
    """One cache through the grid (then the first model again); run in a fresh process by main()."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cache = ModelCache(torch.device("cpu"), memory_budget=budget, share=share)
    for folder in [*folders, folders[0]]:
        cache.pipeline(resolve_model(folder))
    stats = cache.stats
    return {"loads": stats.loads, "component_loads": stats.component_loads, "evictions": stats.evictions,
            "held": len(cache.held_models()), "peak_bytes": stats.peak_bytes,
            "rss_growth_bytes": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", type=int, default=3)
    parser.add_argument("--per-family", type=int, default=7)
    parser.add_argument("--budget-models", type=int, default=3, help="Budget in full pipelines (without sharing).")
    parser.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "engine-model-cache-grid")
    parser.add_argument("--walk", help=argparse.SUPPRESS)  # internal: one measurement in this process
    args = parser.parse_args()
    if args.walk:
        setting = json.loads(args.walk)
        print(json.dumps(walk(setting["folders"], setting["budget"], setting["share"])))
        return
    folders = [str(f) for f in build_grid(args.folder, args.families, args.per_family)]
    pipe = small_pipeline(0, 0)
    full = sum(module_bytes(getattr(pipe, c)) for c in ("unet", "vae", "text_encoder"))
    print(f"grid: {len(folders)} distinct pipelines ({args.families} families sharing text encoder and VAE), "
          f"{full / 1e6:.2f} MB each in fp32 (UNet {module_bytes(pipe.unet) / 1e6:.2f} MB); walked in order, "
          "then the first again")
    print(f"{'budget':>18s} {'sharing':>8s} {'loads':>6s} {'components':>11s} {'evictions':>10s} {'held':>5s} "
          f"{'peak cache MB':>14s} {'peak RSS +MB':>13s}")
    for budget_models in (args.budget_models, None):
        budget = None if budget_models is None else budget_models * full
        for share in (True, False):
            setting = json.dumps({"folders": folders, "budget": budget, "share": share})
            result = subprocess.run([sys.executable, __file__, "--walk", setting], capture_output=True, text=True,
                                    check=True)
            r = json.loads(result.stdout.strip().splitlines()[-1])
            label = "unbounded" if budget is None else f"{budget_models} x full ({budget / 1e6:.1f} MB)"
            print(f"{label:>18s} {'yes' if share else 'no':>8s} {r['loads']:>6d} {r['component_loads']:>11d} "
                  f"{r['evictions']:>10d} {r['held']:>5d} {r['peak_bytes'] / 1e6:>14.2f} "
                  f"{r['rss_growth_bytes'] / 1e6:>13.1f}")


if __name__ == "__main__":
    main()
