"""Best-of-N sweeps exhaustive and with `stop: on_hit`, on the toy world: images made, time, any-hit rates.

    python benchmarks/anytime_sweep.py                          # candidate_batch_size as the run file has it
    python benchmarks/anytime_sweep.py --candidate-batch-size 1 # one candidate per round: the most it can stop

Takes configs/runs/toy_paper.yaml's best-of-N probes (noise_based and its control; the base model and
the four toy erased models, toy_circle and toy_triangle, 8 prompts each), runs them twice with
`engine run` as subprocesses into fresh folders (`stop: none`, then `stop: on_hit`, everything else
equal) and prints per model x probe arm: candidate images made (the rows' candidate_count), the probe
actor's generation seconds (the rows' generation_seconds: each unit's time shared by its rows), the
any-candidate hit rate of both runs (share of rows with some judged candidate, `candidate_hits`) and the
rows whose any-hit differs (matched by model, concept, probe arm, prompt and seed). Then each run's wall
clock from spawn to exit. With candidate_batch_size 1 a stopped sweep makes exactly the exhaustive
sweep's candidates up to its first hit, so no row may differ; with larger batches a round's UNet batch
differs from the exhaustive sweep's and a borderline candidate may move by a pixel level. Never a test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.probe import get_probe_class  # noqa: E402 (after the path)
from engine.results import read_rows  # noqa: E402

COLUMNS = ["model", "concept", "probe", "params", "prompt_index", "seed", "candidate_count", "candidate_hits",
           "generation_seconds"]


def run_file(stop: str, batch: int | None, output: Path) -> dict:
    """toy_paper.yaml with its best-of-N probes only, `stop` and `candidate_batch_size` set."""
    spec = yaml.safe_load((ROOT / "configs" / "runs" / "toy_paper.yaml").read_text())
    probes = [p for p in spec["probes"] if get_probe_class(p["name"]).best_of_n]
    for probe in probes:
        probe["params"] = {**probe.get("params", {}), "stop": stop}
        if batch is not None:
            probe["params"]["candidate_batch_size"] = batch
    return {**spec, "probes": probes, "output": str(output)}


def engine_run(spec: dict, folder: Path) -> float:
    """Wall seconds of one `engine run` subprocess of `spec`."""
    config = folder / f"{Path(spec['output']).name}.yaml"
    config.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "engine.cli", "run", str(config)], env=env, cwd=ROOT,
                          capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"engine run failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return wall


def arm(probe: str, params: str) -> str:
    return f"{probe} control" if json.loads(params).get("control") == "only" else probe


def by_row(output: Path) -> dict[tuple, dict]:
    rows = {}
    for row in read_rows(output, COLUMNS).to_pylist():
        key = (row["model"], row["concept"], arm(row["probe"], row["params"]), row["prompt_index"], row["seed"])
        rows[key] = {"images": row["candidate_count"] or 0, "seconds": row["generation_seconds"],
                     "hit": any(row["candidate_hits"] or [])}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidate-batch-size", type=int, default=None,
                        help="candidates per UNet batch and per round, both runs (default: the run file's)")
    parser.add_argument("--keep", type=Path, default=None, help="write the two runs here instead of a temp folder")
    args = parser.parse_args()
    folder = args.keep or Path(tempfile.mkdtemp(prefix="anytime-"))
    folder.mkdir(parents=True, exist_ok=True)
    walls, results = {}, {}
    for stop in ("none", "on_hit"):
        output = folder / f"stop-{stop}"
        walls[stop] = engine_run(run_file(stop, args.candidate_batch_size, output), folder)
        results[stop] = by_row(output)
    cells: dict[tuple[str, str], dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for key, exhaustive in results["none"].items():
        stopped = results["on_hit"][key]
        cell = cells[(key[0], key[2])]
        for name, value in (("images_none", exhaustive["images"]), ("images_on_hit", stopped["images"]),
                            ("seconds_none", exhaustive["seconds"]), ("seconds_on_hit", stopped["seconds"]),
                            ("hit_none", exhaustive["hit"]), ("hit_on_hit", stopped["hit"]),
                            ("differ", exhaustive["hit"] != stopped["hit"])):
            cell[name].append(value)
    batch = args.candidate_batch_size or "the run file's"
    print(f"candidate_batch_size: {batch}; rows per cell: prompts x concepts of the toy_paper grid")
    print("| model | probe | rows | images exhaustive | images on_hit | factor | gen. s exhaustive | gen. s on_hit "
          "| any-hit exhaustive | any-hit on_hit | rows differing |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    totals = defaultdict(float)
    for (model, probe), cell in sorted(cells.items()):
        n = len(cell["differ"])
        made = sum(cell["images_none"]), sum(cell["images_on_hit"])
        seconds = sum(cell["seconds_none"]), sum(cell["seconds_on_hit"])
        for name, value in (("rows", n), ("none", made[0]), ("on_hit", made[1]), ("s_none", seconds[0]),
                            ("s_on_hit", seconds[1]), ("differ", sum(cell["differ"]))):
            totals[name] += value
        print(f"| {model} | {probe} | {n} | {made[0]} | {made[1]} | {made[0] / max(made[1], 1):.2f}x "
              f"| {seconds[0]:.1f} | {seconds[1]:.1f} | {sum(cell['hit_none']) / n:.0%} "
              f"| {sum(cell['hit_on_hit']) / n:.0%} | {sum(cell['differ'])} |")
    print(f"| all | | {totals['rows']:.0f} | {totals['none']:.0f} | {totals['on_hit']:.0f} "
          f"| {totals['none'] / max(totals['on_hit'], 1):.2f}x | {totals['s_none']:.1f} | {totals['s_on_hit']:.1f} "
          f"| | | {totals['differ']:.0f} |")
    print(f"engine run wall clock, spawn to exit: exhaustive {walls['none']:.0f} s, on_hit {walls['on_hit']:.0f} s")
    print(f"runs in {folder}")


if __name__ == "__main__":
    main()
