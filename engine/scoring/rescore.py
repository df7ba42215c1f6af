"""`engine score RUN_DIR --judge NAME`: add or replace the scores of an existing run, in place.

No image is regenerated: each stored PNG is judged again (cropped to its scoring region) and only
the judge's slot columns change (plus `scoring_seconds`). The run folder may be a local path or a
URI (s3://...). The command holds the folder's lock (no run writes it meanwhile), and every results
file is rewritten atomically (a hidden temporary renamed into place, or one PUT on an object
store), so a killed rescore leaves each file entirely old or entirely new; rows name their judge,
so a partial rescore is visible and rerunning the command completes it. Concepts come from the
current config folders, so a fixed class list takes effect; the manifest records what was used.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from engine.errors import UserError
from engine.lock import OutputLock
from engine.models.loading import resolve_device
from engine.results import (
    ROWS_DIR,
    now_iso,
    parquet_files,
    read_manifest,
    read_rows,
    read_rows_file,
    remove_temporaries,
    require_run_folder,
    table_bytes,
    write_manifest,
)
from engine.scoring.registry import JudgeRequest, check_judges, judge_requests
from engine.scoring.scorer import Scorer
from engine.specs.concepts import load_concept
from engine.storage import OutputLocation, output_location

logger = logging.getLogger(__name__)

ROWS_PER_CHUNK = 256  # decoded images held at once: bounded memory on large files


@dataclass
class RescoreSummary:
    output: OutputLocation
    rows: int
    files: int
    judges: list[str]
    seconds: float


def rescore_run(
    output: str | Path | OutputLocation, refs: Sequence[str | JudgeRequest | dict[str, Any]], device: str = "auto",
    batch_size: int = 32,
) -> RescoreSummary:
    output = output_location(output)
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
    with OutputLock(output, "engine score"):
        return _rescore_locked(output, requests, concepts, scorer)


def _rescore_locked(output: OutputLocation, requests: list[JudgeRequest], concepts, scorer: Scorer) -> RescoreSummary:
    started = time.perf_counter()
    for name in remove_temporaries(output):  # a killed writer's; the files they were replacing are intact
        logger.info("removed a partial file left by an interrupted command: %s", name)
    rows = files = 0
    for name in parquet_files(output):
        try:
            table = read_rows_file(output, name)
        except Exception as exc:  # noqa: BLE001 (damaged; the next resume regenerates its rows)
            logger.warning("skipping unreadable results file %s (%s)", name, exc)
            continue
        chunks = [scorer.score_table(table.slice(s, ROWS_PER_CHUNK)) for s in range(0, table.num_rows, ROWS_PER_CHUNK)]
        if chunks:
            rescored = pa.concat_tables(chunks)
            output.atomic_write(table_bytes(rescored.replace_schema_metadata(table.schema.metadata)), ROWS_DIR, name)
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
