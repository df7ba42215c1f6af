"""What `stop: on_hit` saves, planned (`engine plan`): per best-of-N probe, its exhaustive images and
hours beside the best case (every prompt hit in its first round), the worst (no hit: the exhaustive
sweep) and, when asked, an expected value.

A prompt of N candidates in rounds of b = candidate_batch_size makes round r (r = 0 .. R-1, R =
ceil(N / b), b_r = min(b, N - r b) candidates) only if none of its r b earlier candidates was a hit:

- `--assume-recovery p`, each candidate a hit with probability p independently of the others:
      E[images per prompt] = sum_r b_r (1 - p)^(r b)
- `--from-run DIR`, an earlier run's rows: per cell (model, concept, probe, control arm), each row's
  first hit in coverage order (its `candidate_hits`, read in the order made: `candidate_indices` of a
  stopped row, sweep order otherwise) gives the round in which the planned sweep would stop; the
  cell's mean over its rows is its images per prompt. Positions scale by N_plan / N_earlier where
  the two sweeps differ in size; cells the run lacks are planned as worst cases (and counted).

Prompts whose concept the run's classifier judge has no classes for never stop (full sweep).
Hours scale with images: a best-of-N row's cost is the same per candidate.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

from engine.coverage_order import coverage_order
from engine.errors import UserError
from engine.pipeline.grid import RunGrid
from engine.pipeline.plan import PNDM, costed, row_work

if TYPE_CHECKING:
    from engine.best_of_n import BestOfNParams

Cell = tuple[str, str, str, str]  # (model, concept, probe, control)


@dataclass
class StopEstimate:
    """Images of one probe's best-of-N rows: exhaustive (= worst), best and expected (None: not asked)."""

    exhaustive: float = 0.0
    best: float = 0.0
    expected: float | None = None
    tflop_per_image: float | None = 0.0
    stops: bool = False  # the run sets stop: on_hit (else a what-if)
    never_stop_rows: int = 0  # rows whose concept the judge cannot read
    cells_missing: int = 0  # --from-run: planned cells the earlier run has no rows for


@dataclass
class StopPlan:
    probes: dict[str, StopEstimate] = field(default_factory=dict)
    assumption: str | None = None  # how `expected` was made, for the printout


def expected_images(n: int, b: int, p: float) -> float:
    """E[images per prompt] = sum_r b_r (1 - p)^(r b): round r runs only if its r b predecessors all missed."""
    return sum(min(b, n - start) * (1.0 - p) ** start for start in range(0, n, b))


def images_until(n: int, b: int, first_hit: int | None) -> int:
    """Images a prompt makes when its first hit is at coverage position `first_hit` (None: no hit)."""
    return n if first_hit is None else min(n, (first_hit // b + 1) * b)


def first_hit_position(hits: list[bool], indices: list[int] | None, shape: tuple[int, ...]) -> int | None:
    """Coverage-order position of a row's first hit: `hits` in the order made (`indices`, sweep indices,
    for a stopped row), else in sweep order."""
    if indices is not None:  # a stopped row made its candidates in coverage order
        return next((i for i, hit in enumerate(hits) if hit), None)
    position = {index: pos for pos, index in enumerate(coverage_order(shape))}
    found = [position[i] for i, hit in enumerate(hits) if hit and i in position]
    return min(found) if found else None


def _params(probe: str, params_json: str) -> BestOfNParams:
    """A best-of-N probe's params from a row's params text."""
    from engine.probe import get_probe_class

    return cast("BestOfNParams", get_probe_class(probe).params_class.model_validate_json(params_json))


def read_first_hits(run_dir: str) -> dict[Cell, list[tuple[int | None, int]]]:
    """Per cell of an earlier run, each best-of-N row's (first-hit coverage position, candidates in its sweep)."""
    from engine.metrics.columns import CANDIDATE_HITS
    from engine.results import read_rows

    try:
        table = read_rows(run_dir, ["model", "concept", "probe", "params", "extras", CANDIDATE_HITS])
    except Exception as exc:  # noqa: BLE001 (a folder that is no run, a file of another version)
        raise UserError(f"--from-run {run_dir}: cannot read its rows ({exc})") from None
    cells: dict[Cell, list[tuple[int | None, int]]] = defaultdict(list)
    for row in table.to_pylist():
        hits = row[CANDIDATE_HITS]
        if not hits:
            continue
        params = _params(row["probe"], row["params"])
        shape = tuple(len(getattr(params, name)) for name in params.sweep_fields.values())
        extras = json.loads(row["extras"] or "{}")
        first = first_hit_position(hits, extras.get("candidate_indices"), shape)
        cells[(row["model"], row["concept"], row["probe"], params.control)].append((first, len(params.candidates())))
    if not cells:
        raise UserError(f"--from-run {run_dir}: no best-of-N rows with candidate_hits (score the run with a "
                        "classifier judge first: engine score)")
    return cells


def plan_stop(grid: RunGrid, assume_recovery: float | None = None, from_run: str | None = None) -> StopPlan:
    """Per best-of-N probe of `grid`, the estimate (see the module doc)."""
    from engine.probe import get_probe_class
    from engine.scoring.registry import get_judge_class
    from engine.specs.judges import judge_requests

    if assume_recovery is not None and not 0.0 <= assume_recovery <= 1.0:
        raise UserError(f"--assume-recovery {assume_recovery}: a per-candidate hit probability in [0, 1]")
    earlier = read_first_hits(from_run) if from_run else None
    classifier = next((r for r in judge_requests(grid.spec.judges)
                       if get_judge_class(r.name).slot == "classifier"), None)
    classes_key = getattr(get_judge_class(classifier.name), "classes_key", None) if classifier else None
    plan = StopPlan(assumption=(f"each candidate a hit with probability {assume_recovery:g}, independently"
                                if assume_recovery is not None else
                                f"first hits per cell of {from_run}" if from_run else None))
    missing: set[Cell] = set()
    models = {m.name: m for m in grid.models}
    groups: dict[tuple[str, str, str, str, str], int] = defaultdict(int)  # rows alike for the estimate
    for row in grid.rows:
        if get_probe_class(row.probe).best_of_n:
            groups[(row.model, row.concept, row.target_concept, row.probe, row.params)] += 1
    for (model, concept_name, target, probe, params_json), count in groups.items():
        probe_class = get_probe_class(probe)
        params = _params(probe, params_json)
        if params.keep_all_candidates:
            continue
        n, b = len(params.candidates()), params.candidate_batch_size
        cost = row_work(probe_class(), params, PNDM, costed(models[model]))  # best-of-N probes run their own DDIM
        estimate = plan.probes.setdefault(probe, StopEstimate())
        estimate.stops |= params.stop == "on_hit"
        estimate.tflop_per_image = (None if cost.tflop is None or estimate.tflop_per_image is None
                                    else cost.tflop / n)
        readable = classes_key is not None and classes_key in grid.concepts[target].judge_classes
        estimate.exhaustive += n * count
        estimate.best += (min(b, n) if readable else n) * count
        if not readable:
            estimate.never_stop_rows += count
        if assume_recovery is None and earlier is None:
            continue
        cell: Cell = (model, concept_name, probe, params.control)
        if not readable:
            expected = float(n)
        elif earlier is not None and cell in earlier:
            seen = earlier[cell]  # a first-hit position of a sweep of `total` candidates, scaled to this one's n
            expected = sum(images_until(n, b, None if q is None else q * n // total) for q, total in seen) / len(seen)
        elif earlier is not None:
            missing.add(cell)
            expected = float(n)
        else:
            assert assume_recovery is not None
            expected = expected_images(n, b, assume_recovery)
        estimate.expected = (estimate.expected or 0.0) + expected * count
    for cell in missing:
        plan.probes[cell[2]].cells_missing += 1
    return plan


def stop_lines(plan: StopPlan, tflops: float, gpu: str) -> list[str]:
    """The `engine plan` section: per best-of-N probe, images and GPU-hours exhaustive, best, expected, worst."""
    shown = {name: e for name, e in plan.probes.items() if e.stops or plan.assumption is not None}
    if not shown:
        return []

    def hours(images: float | None, estimate: StopEstimate) -> str:
        if images is None or estimate.tflop_per_image is None:
            return "n/a"
        return f"{images * estimate.tflop_per_image / tflops / 3600:,.1f}"

    lines = ["", f"best-of-N with stop: on_hit (images; GPU-h {gpu}); best: every prompt hit in its first round, "
                 "worst: no hit (= exhaustive)",
             f"  {'probe':44s} {'exhaustive':>12s} {'best':>10s} {'expected':>10s}   {'h exh.':>8s} {'h best':>8s} "
             f"{'h exp.':>8s}"]
    for name, e in shown.items():
        label = name if e.stops else f"{name} (if stop: on_hit)"
        expected = "-" if e.expected is None else f"{e.expected:,.0f}"
        lines.append(f"  {label:44s} {e.exhaustive:>12,.0f} {e.best:>10,.0f} {expected:>10s}   "
                     f"{hours(e.exhaustive, e):>8s} {hours(e.best, e):>8s} {hours(e.expected, e):>8s}")
        if e.never_stop_rows:
            lines.append(f"    {e.never_stop_rows:,d} row(s) the classifier judge has no classes for: full sweep")
        if e.cells_missing:
            lines.append(f"    {e.cells_missing:,d} cell(s) not in the earlier run: planned as no hit")
    if len(shown) > 1:
        total = StopEstimate(
            exhaustive=sum(e.exhaustive for e in shown.values()), best=sum(e.best for e in shown.values()),
            expected=None if any(e.expected is None for e in shown.values()) else
            sum(e.expected or 0.0 for e in shown.values()),
            tflop_per_image=None)
        hours_of = {kind: None if any(e.tflop_per_image is None for e in shown.values()) else
                    sum((getattr(e, kind) or 0.0) * (e.tflop_per_image or 0.0) for e in shown.values())
                    / tflops / 3600 for kind in ("exhaustive", "best", "expected")}
        expected = "-" if total.expected is None else f"{total.expected:,.0f}"
        lines.append(f"  {'total':44s} {total.exhaustive:>12,.0f} {total.best:>10,.0f} {expected:>10s}   "
                     + " ".join("n/a".rjust(8) if hours_of[k] is None or (k == "expected" and total.expected is None)
                                else f"{hours_of[k]:>8,.1f}" for k in ("exhaustive", "best", "expected")))
    if plan.assumption and plan.assumption.startswith("each candidate"):
        lines.append("  expected per prompt of N candidates in rounds of b: sum over rounds r of "
                     "b_r (1 - p)^(r b), b_r = min(b, N - r b); " + plan.assumption)
    elif plan.assumption:
        lines.append(f"  expected: {plan.assumption}, the round of each row's first hit in coverage order")
    return lines
