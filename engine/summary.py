"""A short per-cell summary of a run for the terminal (the full report is `engine report`)."""

from __future__ import annotations

from pathlib import Path

import typer

from engine.results import read_rows

SUMMARY_COLUMNS = ["model", "concept", "probe", "generation_seconds", "clip_score", "judge_top1"]


def summary_frame(output: Path):
    table = read_rows(output, columns=SUMMARY_COLUMNS)
    frame = table.to_pandas()
    grouped = frame.groupby(["model", "concept", "probe"], sort=True)
    result = grouped.agg(
        n=("generation_seconds", "size"),
        seconds_per_image=("generation_seconds", "mean"),
        clip_mean=("clip_score", "mean"),
        top1_rate=("judge_top1", lambda s: s.dropna().astype(float).mean() if s.notna().any() else float("nan")),
    )
    return result.reset_index()


def print_summary(output: Path) -> None:
    frame = summary_frame(output)
    typer.echo("")
    typer.echo(frame.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
