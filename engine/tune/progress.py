"""`engine tune` progress: trials done / total and the best objective so far, per search.

The searches run in Ray tasks, so their Tune callbacks report to a TrialBoard (a Ray actor on the
driver's node) and the driver reads it (engine.pipeline.progress prints it). Ray-free, so tested
without Ray.
"""

from __future__ import annotations

import math
from typing import Any

from engine.tune.space import SearchSpace


def trials_per_search(algorithm: str, num_samples: int, space: SearchSpace, grid_points: int) -> int:
    """How many trials one (model, concept) search runs: every grid point, else num_samples."""
    if algorithm == "grid":
        return math.prod(len(values) for values in space.grid(grid_points).values())
    return num_samples


class TrialBoard:
    """Finished trials and the best complete objective of each search."""

    def __init__(self) -> None:
        self.done: dict[str, int] = {}
        self.best: dict[str, float] = {}

    def trial_finished(self, search: str, objective: Any = None) -> None:
        """A trial ended; `objective` is its metric when it scored every image, else None."""
        self.done[search] = self.done.get(search, 0) + 1
        if objective is not None and not math.isnan(objective):
            self.best[search] = max(self.best.get(search, -math.inf), float(objective))

    def status(self) -> tuple[int, str]:
        """(trials done over all searches, "best <search> <value>, ...")."""
        best = ", ".join(f"{search} {value:.4g}" for search, value in sorted(self.best.items()))
        return sum(self.done.values()), f"best in-sample {best}" if best else ""
