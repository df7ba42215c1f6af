"""`stop: on_hit`: a best-of-N sweep that stops a prompt once one of its candidates is recognised.

What a recovery row of a best-of-N probe answers is "does some setting bring the concept back for
this prompt?" (the any-candidate reading of `candidate_hits`). Once one candidate is recognised, no
later candidate can change that answer, so the rest of the prompt's sweep is not made. Rounds:

1. every prompt's candidates are visited in the coverage-first order (engine.coverage_order), a
   round being the next `candidate_batch_size` of them for every prompt still running, denoised
   `candidate_batch_size` (row, candidate) pairs per UNet batch, as the exhaustive sweep is;
2. after each round the run's classifier judge (ProbeContext.judge_hits: its top-1 in the concept's
   classes, the `judge_top1` rule) looks at the round's images; a prompt with a hit stops and keeps
   the first hit in coverage order. The hits decide the kept image, so they are recorded as a
   selection (`record_selection`): reports mark its judge columns as selection-inflated;
3. a prompt without a hit runs the whole sweep and its selector picks, as without `stop`; so does a
   prompt the judge cannot read (a concept without the judge's classes, a run without a classifier
   judge), which is logged and recorded in its row (`stop_unavailable`).

Each candidate's noise comes from (seed, candidate) alone, so a candidate made here is the same image
the exhaustive sweep makes when both denoise it in the same UNet batch (always with
`candidate_batch_size: 1`); the any-candidate hit of every row is then the exhaustive run's.
Row extras: `candidates_generated`, `stopped_on_hit`, `hit_candidate` (the hit's index in sweep
order), `candidate_indices` (the sweep index of each candidate made, in the order made: the order of
the row's candidate lists, `candidate_hits` included), `selected_candidate` (sweep order).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.coverage_order import coverage_order
from engine.probe import ProbeOutput

if TYPE_CHECKING:
    from engine.probe import ProbeBatch, WorkRow

logger = logging.getLogger(__name__)

# Denoises one chunk of (row, candidate) pairs: (rows, candidates) -> (images, per-candidate extras).
Denoise = Callable[[list, list[dict[str, float]]], tuple[list[np.ndarray], list[dict[str, Any]]]]

_warned: set[str] = set()  # concepts already logged as unjudgeable by this process


@dataclass
class _Prompt:
    """One row's sweep so far."""

    row: WorkRow
    made: list[int] = field(default_factory=list)  # sweep indices, in the order made
    images: list[np.ndarray] = field(default_factory=list)
    extras: list[dict[str, Any]] = field(default_factory=list)
    hit: int | None = None  # position in `made` of the first hit
    unavailable: str | None = None  # why the judge could not read this row, if it could not

    @property
    def running(self) -> bool:
        return self.hit is None


def sweep_order(params: Any, total: int) -> list[int]:
    """The candidates' sweep indices in coverage order (the params' sweep grid, outer axis first)."""
    shape = tuple(len(getattr(params, name)) for name in params.sweep_fields.values())
    if not shape or int(np.prod(shape)) != total:  # a sweep that is not a full grid: keep sweep order
        return list(range(total))
    return coverage_order(shape)


def run_until_hit(batch: ProbeBatch[Any], candidates: list[dict[str, float]], denoise: Denoise) -> ProbeOutput:
    """The rows of `batch`, each stopped at its first judged hit (see the module doc)."""
    params = batch.params
    size = params.candidate_batch_size
    order = sweep_order(params, len(candidates))
    prompts = [_Prompt(row) for row in batch.rows]
    for start in range(0, len(order), size):
        round_indices = order[start : start + size]
        work = [(p, index) for p in prompts if p.running for index in round_indices]
        if not work:
            break
        # 1. The round's (row, candidate) pairs, `candidate_batch_size` per UNet batch.
        for chunk_start in range(0, len(work), size):
            chunk = work[chunk_start : chunk_start + size]
            images, extras = denoise([p.row for p, _ in chunk], [candidates[i] for _, i in chunk])
            for (prompt, index), image, extra in zip(chunk, images, extras, strict=True):
                prompt.made.append(index)
                prompt.images.append(image)
                prompt.extras.append(extra)
        # 2. The judge's verdict on the running prompts' new images, one call per concept; a hit stops its prompt.
        judged: dict[str, list[_Prompt]] = {}
        for prompt in prompts:
            if prompt.running and prompt.unavailable is None:
                judged.setdefault(prompt.row.target_concept, []).append(prompt)
        for concept, group in judged.items():
            _judge_round(batch, concept, group, len(round_indices))
    return _output(batch, candidates, prompts)


def _judge_round(batch: ProbeBatch[Any], concept: str, group: list[_Prompt], new: int) -> None:
    """Judge the last `new` images of each prompt of `group` (one concept); mark each prompt's first hit."""
    judge = batch.context.judge_hits
    images = [image for prompt in group for image in prompt.images[-new:]]
    hits = None if judge is None else judge(images, concept, [None] * len(images), record_selection=True)
    if hits is None:
        reason = "the run has no classifier judge" if judge is None else f"the judge has no classes for {concept}"
        for prompt in group:
            prompt.unavailable = reason
        if concept not in _warned:
            _warned.add(concept)
            logger.warning("stop: on_hit cannot judge %s (%s): its prompts run the full sweep", concept, reason)
        return
    for number, prompt in enumerate(group):
        own = hits[number * new : (number + 1) * new]
        first = next((i for i, hit in enumerate(own) if hit), None)
        if first is not None:
            prompt.hit = len(prompt.images) - new + first


def _output(batch: ProbeBatch[Any], candidates: list[dict[str, float]], prompts: list[_Prompt]) -> ProbeOutput:
    """Per row: the hit, else the selector's argmax over the whole sweep; every candidate made goes
    on to the scoring stage (its `candidate_hits` then read in the order made)."""
    selector = batch.params.selector
    images: list[np.ndarray] = []
    extras: list[dict[str, Any]] = []
    made: list[list[np.ndarray] | None] = []
    for prompt in prompts:
        record: dict[str, Any] = {
            "stop": "on_hit",
            "candidates_generated": len(prompt.made),
            "stopped_on_hit": prompt.hit is not None,
            "hit_candidate": None if prompt.hit is None else prompt.made[prompt.hit],
            "candidate_indices": list(prompt.made),
            "stop_unavailable": prompt.unavailable,
        }
        if prompt.hit is not None:
            chosen = prompt.hit
            record.update(selector="first_hit", selector_score=None)
        else:
            scores_of = batch.context.selector_scores
            assert scores_of is not None  # check_candidates refused a selecting batch without a scoring context
            scores = [float(s) for s in scores_of(selector, prompt.images, prompt.row.target_concept,
                                                  [None] * len(prompt.images))]
            chosen = int(np.argmax(scores))
            record.update(selector=selector, selector_score=scores[chosen], candidate_scores=scores)
        kept = prompt.extras[chosen]
        images.append(prompt.images[chosen])
        made.append(prompt.images)
        extras.append({
            **record,
            "selected_candidate": prompt.made[chosen],
            **candidates[prompt.made[chosen]],
            **kept,
            **{f"candidate_{key}s": [e[key] for e in prompt.extras] for key in kept},
        })
    return ProbeOutput(images=images, extras=extras, candidates=made)
