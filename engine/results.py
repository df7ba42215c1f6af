"""The results dataset: one Arrow schema, PNG helpers, manifest, and read helpers.

<output>/rows/*.parquet holds one row per image; <output>/manifest.json the resolved config,
versions, git commit, times and counts. The schema is defined once, here. An output is a local
folder or a URI (s3://...): every helper takes either (engine.storage).
"""

from __future__ import annotations

import io
import json
import logging
import platform
import subprocess
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from engine import __version__
from engine.errors import UserError
from engine.metrics.columns import (
    CANDIDATE_COLUMNS,
    CANDIDATE_HITS,
    MODEL_COLUMNS,
    TOP5_CLASSES,
    TOP5_PROBS,
    slot_metrics,
)
from engine.storage import TEMPORARY_PREFIX, OutputLocation, output_location

logger = logging.getLogger(__name__)

ROWS_DIR = "rows"
MANIFEST = "manifest.json"

IDENTITY_FIELDS = [
    pa.field("row_id", pa.string(), nullable=False),
    pa.field("model", pa.string(), nullable=False),
    pa.field("method", pa.string(), nullable=False),
    pa.field("concept", pa.string(), nullable=False),
    pa.field("target_concept", pa.string(), nullable=False),
    pa.field("probe", pa.string(), nullable=False),
    pa.field("params", pa.string(), nullable=False),  # canonical JSON
    pa.field("prompt", pa.string(), nullable=False),
    pa.field("prompt_index", pa.int32(), nullable=False),
    pa.field("seed", pa.int64(), nullable=False),
]
# Why a row exists; not hashed into row_id. Null in runs written before they existed.
PAIRING_FIELDS = [
    # recovery (a probe on a concept the model erased), preservation (interference on another
    # concept of its set), base (the base model's reference rows), unpaired (a model that declares
    # nothing): engine.pipeline.pairing.
    pa.field("role", pa.string()),
    pa.field("erased", pa.list_(pa.string())),  # the concepts the row's model erased ([] = none declared)
]
GENERATION_FIELDS = [
    pa.field("image", pa.binary(), nullable=False),  # PNG bytes
    pa.field("image_width", pa.int32(), nullable=False),
    pa.field("image_height", pa.int32(), nullable=False),
    pa.field("scoring_region", pa.list_(pa.int32())),  # [left, top, right, bottom] or null = whole image
    pa.field("extras", pa.string(), nullable=False),  # probe-specific JSON (chosen variant, losses...)
    pa.field("generation_seconds", pa.float64(), nullable=False),  # this row's share of its batch
    pa.field("device", pa.string(), nullable=False),
    pa.field("engine_version", pa.string(), nullable=False),
    # Guidance probes and latent_classifier selection: content hash of the concept's classifier
    # (also in row_id), so a retrained classifier regenerates its rows.
    pa.field("classifier_hash", pa.string()),
]
_ARROW_TYPES = {"bool": pa.bool_(), "float": pa.float64()}
SCORE_FIELDS = [  # null until scored; the metrics and their judge-model columns come from engine.metrics.columns
    *[field for slot, model_column in MODEL_COLUMNS.items()
      for field in [*(pa.field(m.column, _ARROW_TYPES[m.arrow_kind]) for m in slot_metrics(slot)),
                    pa.field(model_column, pa.string())]],
    pa.field("selector", pa.string()),  # best-of-N probes: selector (and its model) that picked the image
    pa.field("scoring_seconds", pa.float64()),
    # Best-of-N probes: how many candidates the row chose from, and each judge's mean over all of
    # them (reports show the selected value next to the all-candidates mean).
    pa.field("candidate_count", pa.int32()),
    *[pa.field(column, pa.float64()) for column in CANDIDATE_COLUMNS],
    pa.field(CANDIDATE_HITS, pa.list_(pa.bool_())),  # best-of-N: each candidate's judge hit, in candidate order
    pa.field(TOP5_CLASSES, pa.list_(pa.int32())),  # the judge's top-5 classes (what was drawn instead)
    pa.field(TOP5_PROBS, pa.list_(pa.float64())),
]
ROW_SCHEMA = pa.schema(IDENTITY_FIELDS + PAIRING_FIELDS + GENERATION_FIELDS + SCORE_FIELDS)
# Between the probe and score stages only: PNG bytes of every best-of-N candidate of a row. The
# score stage judges them and drops the column; it is never written.
CANDIDATE_IMAGES = "candidate_images"
STREAM_SCHEMA = ROW_SCHEMA.append(pa.field(CANDIDATE_IMAGES, pa.list_(pa.binary())))


def encode_png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    # Fixed compression settings so the same pixels always give the same bytes.
    Image.fromarray(image).save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def rows_table(records: list[dict[str, Any]], schema: pa.Schema = ROW_SCHEMA) -> pa.Table:
    """Records with any subset of the schema's columns -> a table with all of them (missing = null)."""
    columns = {f.name: [r.get(f.name) for r in records] for f in schema}
    return pa.table(columns, schema=schema)


Output = str | Path | OutputLocation  # a local folder or a URI (engine.storage)


def rows_location(output: Output) -> OutputLocation:
    return output_location(output).child(ROWS_DIR)


def rows_dir(output: Output) -> str:
    """OUTPUT/rows, as the user would write it (a path or a URI)."""
    return rows_location(output).uri


def parquet_files(output: Output) -> list[str]:
    """Names of the finished results files in OUTPUT/rows. Temporaries (hidden names) are never listed."""
    return rows_location(output).list_files(suffix=".parquet")


def read_rows_file(output: Output, name: str, columns: list[str] | None = None, **options) -> pa.Table:
    rows = rows_location(output)
    return pq.read_table(rows.path(name), filesystem=rows.fs, columns=columns, **options)


def row_columns(output: Output) -> set[str]:
    """Columns every readable row file of a run has (files of older versions may lack some)."""
    rows = rows_location(output)
    names: set[str] | None = None
    for name in rows.list_files(suffix=".parquet"):
        try:
            with rows.open_input(name) as handle:
                file_names = set(pq.read_schema(handle).names)
        except Exception:  # noqa: BLE001 (unreadable files are reported by read_rows)
            continue
        names = file_names if names is None else names & file_names
    return names or set()


def read_rows(output: Output, columns: list[str] | None = None) -> pa.Table:
    """Every readable row of a run. A file that cannot be read (left by an older engine version
    or damaged) is skipped with a warning; its rows count as missing, so a resume regenerates them."""
    output = output_location(output)  # once: opening an object store's file system costs a request
    tables = []
    for name in parquet_files(output):
        try:
            tables.append(read_rows_file(output, name, columns, schema=ROW_SCHEMA if columns is None else None))
        except Exception as exc:  # noqa: BLE001 (truncated or corrupt file)
            logger.warning("skipping unreadable results file %s (%s)", name, exc)
    if not tables:
        schema = ROW_SCHEMA if columns is None else pa.schema([ROW_SCHEMA.field(c) for c in columns])
        return schema.empty_table()
    return pa.concat_tables(tables, promote_options="default")


def finished_row_ids(output: Output) -> set[str]:
    return set(read_rows(output, columns=["row_id"]).column("row_id").to_pylist())


def remove_unreadable_files(output: Output) -> list[str]:
    """Delete results files whose footer cannot be read, so a resume starts clean. Call it only
    while holding the output's lock: no live writer can then be mid-file. (Files are renamed into
    place when complete, so only an older engine version or damage leaves such a file.)"""
    rows = rows_location(output)
    removed = []
    for name in parquet_files(output):
        try:
            with rows.open_input(name) as handle:
                pq.read_metadata(handle)
        except Exception:  # noqa: BLE001 (any read error means a half-written file)
            rows.delete(name)
            removed.append(name)
    return removed


def remove_temporaries(output: Output) -> list[str]:
    """Delete the hidden temporaries a killed writer left in OUTPUT/rows and OUTPUT. Only under
    the output's lock: a temporary then belongs to a writer that is gone."""
    location = output_location(output)
    removed = []
    for folder in ((ROWS_DIR,), ()):
        for name in location.list_files(*folder, hidden=True):
            if name.startswith(TEMPORARY_PREFIX):
                location.delete(*folder, name)
                removed.append("/".join((*folder, name)))
    return removed


def table_bytes(table: pa.Table) -> bytes:
    """A table as the bytes of one Parquet file (written whole with one atomic write)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def require_run_folder(output: Output) -> None:
    location = output_location(output)
    if not location.is_dir():  # on an object store: no object under the prefix
        raise UserError(f"run folder not found: {location}")
    if not parquet_files(location):
        raise UserError(f"{location} holds no result rows ({ROWS_DIR}/*.parquet); run `engine run` first")


# --------------------------------------------------------------------------- manifest

PACKAGES = ["torch", "diffusers", "transformers", "ray", "open_clip_torch", "pyarrow", "pydantic", "numpy"]


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit() -> str | None:
    try:
        repo = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except Exception:  # noqa: BLE001 (no git or not a checkout: no commit to record)
        return None


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def write_manifest(output: Output, content: dict[str, Any]) -> None:
    # Atomic: a killed run never leaves half a manifest.
    output_location(output).atomic_write(json.dumps(content, indent=2, sort_keys=True).encode(), MANIFEST)


def read_manifest(output: Output) -> dict[str, Any]:
    location = output_location(output)
    return json.loads(location.read_text(MANIFEST)) if location.exists(MANIFEST) else {}


def base_manifest(resolved_config: dict[str, Any]) -> dict[str, Any]:
    return {
        "engine_version": __version__,
        "git_commit": git_commit(),
        "packages": package_versions(),
        "config": resolved_config,
    }
