"""Training bookkeeping written beside a classifier: `<concept>_metrics.csv` and `.png`.

The CSV is written first, and a failing plot only logs a warning (the original crashed here and
lost the run's bookkeeping).
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def write_metrics(directory: str | Path, concept: str, history: list[dict[str, float]]) -> tuple[Path, Path | None]:
    """`<concept>_metrics.csv` and `<concept>_metrics.png` (loss and validation metrics per epoch).
    Returns the paths; the plot path is None when plotting failed (logged, never raised)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    csv_path = directory / f"{concept}_metrics.csv"
    columns = list(history[0]) if history else ["epoch"]
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(history)
    plot_path = directory / f"{concept}_metrics.png"
    try:
        _plot(history, concept, plot_path)
    except Exception as exc:  # noqa: BLE001 (bookkeeping must never lose a trained classifier)
        logger.warning("could not draw %s: %s", plot_path, exc)
        return csv_path, None
    return csv_path, plot_path


def _plot(history: list[dict[str, float]], concept: str, path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, safe in Ray workers

    epochs = [row["epoch"] for row in history]
    figure = Figure(figsize=(10, 4), dpi=100)
    losses, ranking = figure.subplots(1, 2)
    for key in ("train_loss", "val_loss"):
        losses.plot(epochs, [row[key] for row in history], marker=".", label=key)
    losses.set(xlabel="epoch", ylabel="weighted BCE", title=f"{concept}: loss")
    losses.legend()
    for key in ("roc_auc", "pr_auc", "tpr_at_5_fpr"):
        ranking.plot(epochs, [row[key] for row in history], marker=".", label=key)
    ranking.set(xlabel="epoch", ylim=(0, 1.02), title=f"{concept}: validation")
    ranking.legend()
    figure.tight_layout()
    figure.savefig(path)


