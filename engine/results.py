"""The results dataset: one Arrow schema, PNG helpers, manifest, and read helpers.

<output>/rows/*.parquet holds one row per image; <output>/manifest.json the resolved config,
versions, git commit, times and counts. The schema is defined once, here.
"""

from __future__ import annotations

import io
import json
import logging
import platform
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from engine import __version__
from engine.errors import UserError
from engine.metrics import CANDIDATE_COLUMNS, MODEL_COLUMNS, slot_metrics

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
]
_ARROW_TYPES = {"bool": pa.bool_(), "float": pa.float64()}
SCORE_FIELDS = [  # null until scored; the metrics and their judge-model columns come from engine.metrics
    *[field for slot, model_column in MODEL_COLUMNS.items()
      for field in [*(pa.field(m.column, _ARROW_TYPES[m.arrow_kind]) for m in slot_metrics(slot)),
                    pa.field(model_column, pa.string())]],
    pa.field("selector", pa.string()),  # best-of-N probes: selector (and its model) that picked the image
    pa.field("scoring_seconds", pa.float64()),
    # Best-of-N probes: how many candidates the row chose from, and each judge's mean over all of
    # them (reports show the selected value next to the all-candidates mean).
    pa.field("candidate_count", pa.int32()),
    *[pa.field(column, pa.float64()) for column in CANDIDATE_COLUMNS],
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


def rows_dir(output: Path) -> Path:
    return Path(output) / ROWS_DIR


def parquet_files(output: Path) -> list[Path]:
    return sorted(rows_dir(output).glob("*.parquet"))


def row_columns(output: Path) -> set[str]:
    """Columns every readable row file of a run has (files of older versions may lack some)."""
    names: set[str] | None = None
    for path in parquet_files(output):
        try:
            file_names = set(pq.read_schema(path).names)
        except Exception:  # unreadable files are reported by read_rows
            continue
        names = file_names if names is None else names & file_names
    return names or set()


def read_rows(output: Path, columns: list[str] | None = None) -> pa.Table:
    """Every readable row of a run. A file left half-written by a killed run cannot be read; it is
    skipped with a warning (its rows are missing, so a resume regenerates them)."""
    tables = []
    for path in parquet_files(output):
        try:
            tables.append(pq.read_table(path, columns=columns, schema=ROW_SCHEMA if columns is None else None))
        except Exception as exc:  # truncated or corrupt file from an interrupted write
            logger.warning("skipping unreadable results file %s (%s)", path, exc)
    if not tables:
        schema = ROW_SCHEMA if columns is None else pa.schema([ROW_SCHEMA.field(c) for c in columns])
        return schema.empty_table()
    return pa.concat_tables(tables, promote_options="default")


def finished_row_ids(output: Path) -> set[str]:
    return set(read_rows(output, columns=["row_id"]).column("row_id").to_pylist())


def remove_unreadable_files(output: Path) -> list[Path]:
    """Delete result files a killed run left half-written, so a resume starts clean."""
    removed = []
    for path in parquet_files(output):
        try:
            pq.read_metadata(path)
        except Exception:
            path.unlink()
            removed.append(path)
    return removed


def require_run_folder(output: Path) -> None:
    if not Path(output).is_dir():
        raise UserError(f"run folder not found: {output}")
    if not parquet_files(output):
        raise UserError(f"{output} holds no result rows ({ROWS_DIR}/*.parquet); run `engine run` first")


# --------------------------------------------------------------------------- manifest

PACKAGES = ["torch", "diffusers", "transformers", "ray", "open_clip_torch", "pyarrow", "pydantic", "numpy"]


def package_versions() -> dict[str, str | None]:
    versions = {"python": platform.python_version()}
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
    except Exception:
        return None


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_manifest(output: Path, content: dict[str, Any]) -> None:
    path = Path(output) / MANIFEST
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(content, indent=2, sort_keys=True))
    temporary.replace(path)  # atomic: a killed run never leaves half a manifest


def read_manifest(output: Path) -> dict[str, Any]:
    path = Path(output) / MANIFEST
    return json.loads(path.read_text()) if path.exists() else {}


def base_manifest(resolved_config: dict[str, Any]) -> dict[str, Any]:
    return {
        "engine_version": __version__,
        "git_commit": git_commit(),
        "packages": package_versions(),
        "config": resolved_config,
    }
