"""A short per-cell summary of a run for the terminal (the full report is `engine report`)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import typer

from engine.report.sections import fmt_interval, fmt_number
from engine.report.tables import cell_stats, load_rows


def summary_frame(output: Path) -> pd.DataFrame:
    """One line per (model, concept, probe) cell: n, seconds per image, CLIP and top-1 with 95% CIs."""
    # A resumed run may mix judges; the terminal summary still shows it (`engine report` refuses).
    cells = cell_stats(load_rows([Path(output)], single_judge=False))
    return pd.DataFrame(
        {
            "model": cells["model"],
            "concept": cells["concept"],
            "probe": cells["probe_label"],
            "n": cells["n"],
            "s/image": [fmt_number(v) for v in cells["seconds_per_image"]],
            "CLIP [95% CI]": [
                fmt_interval(m, lo, hi) for m, lo, hi in zip(cells.clip_mean, cells.clip_ci_low, cells.clip_ci_high)
            ],
            "top-1 % [95% CI]": [
                fmt_interval(r, lo, hi, 100.0, 1)
                for r, lo, hi in zip(cells.top1_rate, cells.top1_ci_low, cells.top1_ci_high)
            ],
        }
    )


def print_summary(output: Path) -> None:
    typer.echo("")
    typer.echo(summary_frame(output).to_string(index=False))
