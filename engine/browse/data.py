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
from engine.probe import BASE, PRESERVATION, RECOVERY, UNPAIRED, baseline_probes
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
        self.frame = frame
        roles = self.roles()
        self.default_role: str | None = RECOVERY if RECOVERY in roles else (roles[0] if roles else None)
        self.images = ImageIndex(run_dirs)
        self._base = {(r.prompt, int(r.seed), r.probe_label): r.row_id
                      for r in frame[frame["method"] == BASE_METHOD].itertuples()}
        self._baseline = baseline_probes(frame["probe"])
        self._cells: dict[str | None, dict[tuple[str, str, str], Cell]] = {}
        self.shown = self.view(None)  # what the overview opens on
        self.cells = self.cells_of(None)

    def roles(self) -> list[str]:
        """The row roles a user can look at (the base model's rows come with each, as its reference)."""
        present = set(self.frame["role"])
        return [role for role in (RECOVERY, PRESERVATION, UNPAIRED) if role in present]

    def view(self, role: str | None) -> pd.DataFrame:
        """The rows of one role (default: erased models on what they erased, else every row) with the
        base model's rows on the same concepts beside them. KeyError for a role the runs do not have."""
        role = role or self.default_role
        if role is None:
            return self.frame
        if role not in self.roles():
            raise KeyError(role)
        rows = self.frame[self.frame["role"] == role]
        base = self.frame[(self.frame["role"] == BASE) & self.frame["concept"].isin(set(rows["concept"]))]
        return pd.concat([base, rows])

    def cells_of(self, role: str | None) -> dict[tuple[str, str, str], Cell]:
        if role not in self._cells:
            cells = {}
            for (method, concept, probe), group in self.view(role).groupby(["method", "concept", "probe_label"],
                                                                              sort=True):
                judged = group["judge_top1"].dropna()
                hits = int(judged.astype(bool).sum())
                low, high = wilson_interval(hits, len(judged))
                cells[(method, concept, probe)] = Cell(method, concept, probe, len(judged), hits, low, high)
            self._cells[role] = cells
        return self._cells[role]

    def probes(self, role: str | None = None) -> list[str]:
        return probe_order(self.view(role)["probe_label"])

    def methods(self, role: str | None = None) -> list[str]:
        return method_order(self.view(role)["method"])

    def concepts(self, role: str | None = None) -> list[str]:
        return sorted(self.view(role)["concept"].unique())

    def cell_rows(self, method: str, concept: str, probe: str, role: str | None = None) -> pd.DataFrame:
        view = self.view(role)
        return view[(view["method"] == method) & (view["concept"] == concept) & (view["probe_label"] == probe)]

    def rows(self, method: str, concept: str, probe: str, sort: str, hit: str, role: str | None = None) -> pd.DataFrame:
        rows = self.cell_rows(method, concept, probe, role)
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
