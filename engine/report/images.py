"""Images of a report, read a few at a time: the memory bound of `engine report`.

A report holds the score columns of every row (`engine.report.tables.load_rows`, no images) and,
while it draws one sheet, the images of the Parquet row groups that hold that sheet's rows, never
the image column of the whole dataset. The index maps each row_id to its (run, file, row group)
from the row_id column alone; a sheet then reads only its row groups with the projection
(row_id, image) and keeps the rows it asked for. Row groups are cached least recently used under a
byte budget, because consecutive cells (sorted by model, probe, params) mostly share a results file
(a work unit's rows): without it a grid's sheets would read most files several times.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path

import pyarrow.parquet as pq

from engine.results import parquet_files, rows_location
from engine.storage import OutputLocation, output_location

CACHE_BYTES = 256 * 1024**2  # row groups kept between sheets; one larger group is still read, then dropped

Place = tuple[int, str, int]  # (run position, file name, row group)


class ImageIndex:
    """Where each row's image is; `images(row_ids)` reads only the row groups that hold them."""

    def __init__(self, run_dirs: Sequence[str | Path | OutputLocation], cache_bytes: int = CACHE_BYTES) -> None:
        self._runs = [rows_location(output_location(d) if not isinstance(d, OutputLocation) else d)
                      for d in run_dirs]
        self._places: dict[str, Place] = {}
        self._cache: OrderedDict[Place, dict[str, bytes]] = OrderedDict()
        self._cache_sizes: dict[Place, int] = {}
        self._cache_bytes = cache_bytes
        self.groups_read = 0  # how many row groups were read (tests and the benchmark look at it)
        for position, (run_dir, rows) in enumerate(zip(run_dirs, self._runs, strict=True)):
            for name in parquet_files(run_dir):
                try:
                    with rows.open_input(name) as handle:
                        parquet = pq.ParquetFile(handle)
                        for group in range(parquet.num_row_groups):
                            ids = parquet.read_row_group(group, columns=["row_id"]).column("row_id").to_pylist()
                            for row_id in ids:  # the first run holding a row wins, as in load_rows
                                self._places.setdefault(row_id, (position, name, group))
                except Exception:  # noqa: BLE001 (unreadable files are reported by read_rows)
                    continue

    def images(self, row_ids: Iterable[str]) -> dict[str, bytes]:
        """PNG bytes of these rows (rows without a readable image are left out)."""
        wanted: dict[Place, list[str]] = {}
        for row_id in row_ids:
            if row_id in self._places:
                wanted.setdefault(self._places[row_id], []).append(row_id)
        found: dict[str, bytes] = {}
        for place, ids in wanted.items():
            group = self._group(place)
            found.update({i: group[i] for i in ids if i in group})
        return found

    def _group(self, place: Place) -> dict[str, bytes]:
        if place in self._cache:
            self._cache.move_to_end(place)
            return self._cache[place]
        position, name, group = place
        with self._runs[position].open_input(name) as handle:
            table = pq.ParquetFile(handle).read_row_group(group, columns=["row_id", "image"])
        self.groups_read += 1
        images = dict(zip(table.column("row_id").to_pylist(), table.column("image").to_pylist(), strict=True))
        size = table.nbytes
        self._cache[place], self._cache_sizes[place] = images, size
        while sum(self._cache_sizes.values()) > self._cache_bytes and len(self._cache) > 1:
            oldest, _ = self._cache.popitem(last=False)
            del self._cache_sizes[oldest]
        return images

