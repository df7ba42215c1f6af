"""`engine score RUN_DIR --judge NAME`: add or replace the scores of an existing run, in place.

No image is regenerated: each stored PNG is judged again (cropped to its scoring region) and only
the judge's slot columns change (plus `scoring_seconds`). Every results file is rewritten
atomically (a temporary file in the same folder, then os.replace), so a killed rescore leaves each
file entirely old or entirely new; rows name their judge, so a partial rescore is visible and
rerunning the command completes it. Concepts come from the current config folders, so a fixed
class list takes effect; the manifest records what was used.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from engine.concepts import load_concept
from engine.errors import UserError
from engine.models import resolve_device
from engine.results import (
    now_iso,
    parquet_files,
    read_manifest,
    read_rows,
    require_run_folder,
    rows_dir,
    write_manifest,
)
from engine.scoring.registry import JudgeRequest, check_judges, judge_requests
from engine.scoring.scorer import Scorer

logger = logging.getLogger(__name__)

TEMPORARY_SUFFIX = ".rescoring"  # not *.parquet, so readers never pick up a half-written file
ROWS_PER_CHUNK = 256  # decoded images held at once: bounded memory on large files


@dataclass
class RescoreSummary:
    output: Path
    rows: int
    files: int
    judges: list[str]
    seconds: float


def rescore_run(
    output: Path, refs: list[str | JudgeRequest | dict[str, Any]], device: str = "auto", batch_size: int = 32
) -> RescoreSummary:
    output = Path(output)
    require_run_folder(output)
    requests = judge_requests(refs)
    if not requests:
        raise UserError("name at least one judge (--judge clip, --judge imagenet, ...)")
    names = sorted(set(read_rows(output, columns=["target_concept"]).column("target_concept").to_pylist()))
    if not names:
        raise UserError(f"{output} holds no readable result rows")
    concepts = {name: load_concept(name) for name in names}
    check_judges(requests, concepts)
    scorer = Scorer.from_requests(requests, concepts, resolve_device(device), batch_size)

    started = time.perf_counter()
    for stale in rows_dir(output).glob(f"*{TEMPORARY_SUFFIX}"):
        stale.unlink()  # left by a killed rescore; the file it was replacing is intact
    rows = files = 0
    for path in parquet_files(output):
        try:
            table = pq.read_table(path)
        except Exception as exc:  # half-written by a killed run; the next resume regenerates it
            logger.warning("skipping unreadable results file %s (%s)", path.name, exc)
            continue
        chunks = [scorer.score_table(table.slice(s, ROWS_PER_CHUNK)) for s in range(0, table.num_rows, ROWS_PER_CHUNK)]
        if chunks:
            _replace_atomically(pa.concat_tables(chunks), path)
        rows += table.num_rows
        files += 1
    seconds = time.perf_counter() - started
    model_ids = [judge.model_id for judge in scorer.judges]
    manifest = read_manifest(output)
    manifest.setdefault("scoring_history", []).append(
        {
            "finished_at": now_iso(),
            "judges": model_ids,
            "requests": [r.model_dump(mode="json") for r in requests],
            "concepts": {k: v.model_dump(mode="json") for k, v in concepts.items()},
            "rows": rows,
        }
    )
    write_manifest(output, manifest)
    return RescoreSummary(output, rows, files, model_ids, seconds)


def _replace_atomically(table: pa.Table, path: Path) -> None:
    temporary = path.with_name(path.name + TEMPORARY_SUFFIX)
    pq.write_table(table, temporary)
    os.replace(temporary, path)
