"""Fixtures of the pipeline tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from engine.cli import app

PAPER = Path(__file__).resolve().parents[2] / "configs/runs/paper.yaml"


@pytest.fixture(scope="session")
def paper_plan_output() -> str:
    """`engine plan configs/runs/paper.yaml --actors 8`'s output, made once: expanding the 70,200-row grid
    takes most of half a minute, and several tests read different parts of what it prints."""
    result = CliRunner().invoke(app, ["plan", str(PAPER), "--actors", "8"])
    assert result.exit_code == 0, result.output
    return result.output
