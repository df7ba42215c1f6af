"""`engine export RUN --format hf DIR`: a run folder as a Hugging Face dataset folder.

DIR/data/train-NNNNN-of-NNNNN.parquet holds every result row with the run's own typed columns;
`image` becomes the struct {bytes, path} that `datasets` stores images as, and each file's schema
carries the `huggingface` metadata naming it an `Image` feature (the other columns' features are
inferred from their Arrow types), so `datasets.load_dataset("parquet", data_dir=DIR)` opens it with
decoded images and no conversion. DIR/README.md is the dataset card (engine.export.card).

One results file is read and written at a time (memory: one file's rows), so a grid exports in
the memory of its largest results file. Nothing here imports `datasets`: the folder is plain
Parquet plus metadata; pushing to the hub (engine.export.push) needs `huggingface_hub`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from engine.errors import UserError
from engine.export.card import write_card
from engine.results import Output, parquet_files, read_manifest, read_rows_file, require_run_folder
from engine.storage import output_location

logger = logging.getLogger(__name__)

IMAGE_TYPE = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])
HF_METADATA = {b"huggingface": json.dumps({"info": {"features": {"image": {"_type": "Image"}}}}).encode()}


@dataclass(frozen=True)
class Export:
    folder: Path
    rows: int
    files: int


def check_export_folder(folder: Path) -> None:
    """An export goes into a new or empty folder: never over another dataset's files."""
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise UserError(f"{folder} exists and is not an empty folder: give a new folder to export into")


def export_hf(run_dir: Output, folder: Path) -> Export:
    """Write the run's rows and its dataset card into `folder`. Raises UserError on bad input."""
    require_run_folder(run_dir)
    check_export_folder(folder)
    location = output_location(run_dir)
    names = parquet_files(location)
    (folder / "data").mkdir(parents=True, exist_ok=True)
    rows, written = 0, 0
    for name in names:
        try:
            table = read_rows_file(location, name)
        except Exception as exc:  # noqa: BLE001 (a damaged file: as every reader, skip it and say so)
            logger.warning("skipping unreadable results file %s (%s)", name, exc)
            continue
        path = folder / "data" / f"train-{written:05d}-of-{len(names):05d}.parquet"
        pq.write_table(hf_table(table), path)
        rows, written = rows + table.num_rows, written + 1
    if not rows:
        raise UserError(f"{run_dir} holds no readable result rows to export")
    _renumber(folder / "data", written, len(names))
    write_card(folder / "README.md", read_manifest(location), folder / "data")
    return Export(folder, rows, written)


def hf_table(table: pa.Table) -> pa.Table:
    """The rows with `image` as datasets' image struct, every field nullable (datasets' features are)."""
    images = table.column("image").combine_chunks()
    struct = pa.StructArray.from_arrays([images, pa.nulls(len(images), pa.string())], fields=list(IMAGE_TYPE))
    table = table.set_column(table.schema.get_field_index("image"), pa.field("image", IMAGE_TYPE), struct)
    schema = pa.schema([field.with_nullable(True) for field in table.schema], metadata=HF_METADATA)
    return table.cast(schema)


def _renumber(data: Path, written: int, planned: int) -> None:
    """File names say `-of-<count>`: fix them when unreadable files were skipped."""
    if written == planned:
        return
    for index in range(written):
        old, new = (data / f"train-{index:05d}-of-{count:05d}.parquet" for count in (planned, written))
        old.rename(new)
