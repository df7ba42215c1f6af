"""Driver-side checks of a run's scoring, before Ray or any model starts: judges and selectors."""

from __future__ import annotations

from typing import Any

from engine.scoring.registry import check_judges, judge_requests
from engine.scoring.selectors import check_selectors
from engine.specs.concepts import ConceptSpec
from engine.specs.runs import RunSpec


def check_run_scoring(spec: RunSpec, concepts: dict[str, ConceptSpec], probe_params: list[Any]) -> None:
    """Judge options and weights, one judge per slot, concepts judgeable, selectors usable. Raises UserError."""
    requests = judge_requests(spec.judges)
    check_judges(requests, concepts)
    check_selectors(probe_params, requests, concepts)
