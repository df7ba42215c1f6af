"""`engine report` on a synthetic run of the paper grid's size: time and peak memory.

    PYTHONPATH=$PWD HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/report_scale.py            # 58,890 rows
    PYTHONPATH=$PWD HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/report_scale.py --fraction 0.25 --keep DIR

The rows are the paper grid's own (configs/runs/paper.yaml expanded, so the real models, concepts,
probes, params, roles, prompts and seeds), sampled down to `--rows` x `--fraction` with a fixed
seed, every column of the real schema (engine.results.ROW_SCHEMA) filled: a small random-noise PNG
of `--image-px` pixels (noise does not compress, so its bytes are an upper bound for its size), and
random judge scores with top-5 classes. Rows are written as a run writes them: one results file per
work unit (rows sharing model, probe and params, at most `--rows-per-file`).

`engine report` then runs in a fresh process (`python -m engine.cli report`); the script prints its
wall time, its peak resident memory (ru_maxrss of the child), the size of report.html and how many
sheet files it wrote, plus the dataset's size on disk and that of its image column.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from itertools import groupby
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from engine.pipeline.grid import expand_run
from engine.results import encode_png, rows_table
from engine.specs.runs import load_run_file

PAPER = Path(__file__).resolve().parent.parent / "configs" / "runs" / "paper.yaml"
JUDGE = "imagenet:resnet50/IMAGENET1K_V2"
CLIP = "clip:ViT-B-32/openai"


def write_synthetic_run(folder: Path, rows: int, image_px: int, rows_per_file: int, seed: int = 0) -> int:
    """The paper grid's rows, `rows` of them, with images and scores; returns the rows written."""
    grid = expand_run(load_run_file(PAPER), strict=False)
    chosen = sorted(random.Random(seed).sample(range(len(grid.rows)), min(rows, len(grid.rows))))
    work = [grid.rows[i] for i in chosen]
    generator = np.random.default_rng(seed)
    pool = [encode_png(generator.integers(0, 256, (image_px, image_px, 3), dtype=np.uint8)) for _ in range(256)]
    (folder / "rows").mkdir(parents=True, exist_ok=True)
    files = 0
    for _, unit in groupby(work, key=lambda r: (r.model, r.probe, r.params)):
        unit = list(unit)
        for start in range(0, len(unit), rows_per_file):
            records = [_record(row, pool, generator, image_px) for row in unit[start:start + rows_per_file]]
            pq.write_table(rows_table(records), folder / "rows" / f"part-{files:05d}.parquet")
            files += 1
    (folder / "manifest.json").write_text(json.dumps({"synthetic": True, "rows": len(work)}))
    return len(work)


def _record(row, pool: list[bytes], generator: np.random.Generator, image_px: int) -> dict:
    probs = np.sort(generator.dirichlet(np.ones(1000)))[::-1][:5]
    classes = generator.choice(1000, 5, replace=False)
    top1 = bool(generator.random() < 0.3)
    return {
        "row_id": row.row_id, "model": row.model, "method": row.method, "concept": row.concept,
        "target_concept": row.target_concept, "probe": row.probe, "params": row.params, "prompt": row.prompt,
        "prompt_index": row.prompt_index, "seed": row.seed, "role": row.role, "erased": list(row.erased),
        "image": pool[int(generator.integers(len(pool)))], "image_width": image_px, "image_height": image_px,
        "extras": "{}", "generation_seconds": 1.0, "device": "cuda", "engine_version": "synthetic",
        "classifier_hash": row.classifier_hash, "clip_score": float(generator.normal(28, 3)), "clip_model": CLIP,
        "judge_top1": top1, "judge_top5": top1 or bool(generator.random() < 0.2),
        "judge_target_prob": float(generator.random()), "judge_model": JUDGE, "scoring_seconds": 0.01,
        "judge_top5_classes": [int(c) for c in classes], "judge_top5_probs": [float(p) for p in probs],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=58_890)
    parser.add_argument("--fraction", type=float, default=1.0, help="run this share of --rows (slow machines)")
    parser.add_argument("--image-px", type=int, default=64)
    parser.add_argument("--rows-per-file", type=int, default=64)
    parser.add_argument("--keep", type=Path, help="build the run here and keep it (default: a temporary folder)")
    parser.add_argument("--report-args", default="", help="extra `engine report` arguments, e.g. '--cells none'")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="report-scale-") as scratch:
        run = args.keep or Path(scratch) / "run"
        started = time.perf_counter()
        if (run / "rows").is_dir():
            rows = pq.ParquetDataset(run / "rows").read(columns=["row_id"]).num_rows
        else:
            rows = write_synthetic_run(run, round(args.rows * args.fraction), args.image_px, args.rows_per_file)
        built = time.perf_counter() - started
        data_bytes = sum(p.stat().st_size for p in (run / "rows").glob("*.parquet"))
        image_bytes = sum(pq.ParquetFile(p).metadata.row_group(0).column(
            pq.ParquetFile(p).schema_arrow.get_field_index("image")).total_compressed_size
            for p in (run / "rows").glob("*.parquet"))
        print(f"dataset: {rows} rows, {len(list((run / 'rows').glob('*.parquet')))} files, "
              f"{data_bytes / 1e6:.0f} MB on disk ({image_bytes / 1e6:.0f} MB of images), built in {built:.0f} s")
        report = Path(scratch) / "report"
        command = [sys.executable, "-m", "engine.cli", "report", str(run), "--output", str(report),
                   *args.report_args.split()]
        started = time.perf_counter()
        subprocess.run(command, check=True)
        seconds = time.perf_counter() - started
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        sheets = list((report / "sheets").glob("*.png"))
        html = (report / "report.html").stat().st_size
        print(f"engine report: {seconds:.0f} s, peak RSS {peak_mb:.0f} MB, report.html {html / 1e6:.2f} MB, "
              f"{len(sheets)} sheet files ({sum(p.stat().st_size for p in sheets) / 1e6:.0f} MB)")


if __name__ == "__main__":
    main()
