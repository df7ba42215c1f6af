"""What `engine browse` shows, read once at start: the score columns of every row (no images,
engine.report.tables.load_rows) and an index of where each image is (engine.report.images), so a
page reads only its own images. Nothing here writes: the browser is read-only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from engine.metrics.stats import wilson_interval
from engine.probe import BASE, RECOVERY, baseline_probes
from engine.report.images import ImageIndex
from engine.report.tables import BASE_METHOD, load_rows, method_order, probe_order

PAGE = 24  # images per cell page
SORTS = ("prob-desc", "prob-asc", "seed")  # target probability highest first (default), lowest first, seed
HITS = ("all", "hit", "miss")


@dataclass(frozen=True)
class Cell:
    method: str
    concept: str
    probe: str  # a probe label (`noise_based[eta=1.5]` when a probe ran with several params)
    n: int
    hits: int
    low: float | None
    high: float | None

    @property
    def rate(self) -> float | None:
        return self.hits / self.n if self.n else None


class BrowseData:
    def __init__(self, run_dirs: Sequence[str | Path]) -> None:
        self.runs = [str(d) for d in run_dirs]
        # A resumed run may mix judges; browsing shows it as it is (`engine report` refuses).
        frame = load_rows(run_dirs, single_judge=False)
        # Erased models on what they erased, when the run pairs them; else every row.
        paired = frame["role"].isin([RECOVERY]).any()
        self.frame = frame
        self.shown = frame[frame["role"].isin([RECOVERY, BASE])] if paired else frame
        self.images = ImageIndex(run_dirs)
        self._base = {(r.prompt, int(r.seed), r.probe_label): r.row_id
                      for r in frame[frame["method"] == BASE_METHOD].itertuples()}
        self._baseline = baseline_probes(frame["probe"])
        self.cells = self._cells()

    def _cells(self) -> dict[tuple[str, str, str], Cell]:
        cells = {}
        for (method, concept, probe), group in self.shown.groupby(["method", "concept", "probe_label"], sort=True):
            judged = group["judge_top1"].dropna()
            hits = int(judged.astype(bool).sum())
            low, high = wilson_interval(hits, len(judged))
            cells[(method, concept, probe)] = Cell(method, concept, probe, len(judged), hits, low, high)
        return cells

    def probes(self) -> list[str]:
        return probe_order(self.shown["probe_label"])

    def methods(self) -> list[str]:
        return method_order(self.shown["method"])

    def concepts(self) -> list[str]:
        return sorted(self.shown["concept"].unique())

    def rows(self, method: str, concept: str, probe: str, sort: str, hit: str) -> pd.DataFrame:
        rows = self.shown[(self.shown["method"] == method) & (self.shown["concept"] == concept)
                          & (self.shown["probe_label"] == probe)]
        if hit != "all":
            wanted = hit == "hit"
            rows = rows[rows["judge_top1"].notna() & (rows["judge_top1"].astype("boolean") == wanted)]
        if sort == "seed":
            return rows.sort_values(["prompt_index", "seed", "row_id"])
        return rows.sort_values(["judge_target_prob", "row_id"], ascending=[sort == "prob-asc", True],
                                na_position="last")

    def base_row_id(self, row: dict[str, Any]) -> str | None:
        """The base model's image of the same prompt and seed: the same probe's, else its plain prompt's."""
        if row["method"] == BASE_METHOD:
            return None
        found = self._base.get((row["prompt"], int(row["seed"]), row["probe_label"]))
        if found is None:
            for probe in sorted(self._baseline):
                found = self._base.get((row["prompt"], int(row["seed"]), probe)) or found
        return found

    def image(self, row_id: str) -> bytes | None:
        return self.images.images([row_id]).get(row_id)
