"""Which score columns of a best-of-N row are selection-inflated: picked by the model that judges them.

A best-of-N probe keeps, per prompt, the candidate its selector ranks highest. If the selector is
the same model as a judge, that judge's columns of the kept image are a maximum over N of its own
score, not a sample of it: with CLIP selecting among 24 candidates, the kept image's `clip_score`
is the best of 24 CLIP scores, whatever the model under test does. Reports mark such a column and
show the mean over all candidates beside it (the scoring stage stores it per row); a column judged
by a different model than the selector is an honest sample of that judge, although a correlated
selector still raises it.

The row columns this reads: `selector` (written by the probe stage as `<selector>=<model id>`,
several joined by "+", e.g. "clip=clip:ViT-B-32/openai"), `judge_model` and `clip_model` (the
judges' model ids, written by the scoring stage). Pure: no model, no I/O.
"""

from __future__ import annotations

from engine.metrics.columns import METRIC_BY_COLUMN, slot_metrics

# Selectors that reuse a judge of the run, by judge slot (engine.scoring.selectors.SELECTOR_SLOTS);
# used only for a selector recorded without its model id.
_SELECTOR_SLOT = {"clip": "clip", "judge": "classifier", "judge->clip": "clip"}
# How tables name a recorded selector (engine.scoring.selectors: judge->clip is judge selection that
# fell back to CLIP on a concept without judge classes).
_SELECTOR_LABELS = {"clip": "CLIP", "judge": "judge", "judge->clip": "CLIP (judge fallback)",
                    "latent_classifier": "latent classifier", "none": "none"}


def selector_names(recorded: list[str | None]) -> list[str]:
    """The selectors named in `selector` column values (model ids dropped), as tables show them, sorted."""
    names = set()
    for value in recorded:
        for part in (value or "").split("+"):
            name = part.strip().partition("=")[0]
            if name:
                names.add(_SELECTOR_LABELS.get(name, name))
    return sorted(names)


def selection_inflated(selector: str | None, judge_model: str | None, clip_model: str | None) -> set[str]:
    """The score columns ("clip_score", "judge_top1", "judge_top5", "judge_target_prob") of a row
    that were chosen by the same model that judges them. Empty for rows no selector picked
    (None, "none", keep-all rows) and for selectors that are no judge (latent_classifier)."""
    judged_by = {"clip": clip_model, "classifier": judge_model}
    inflated: set[str] = set()
    for part in (selector or "").split("+"):
        name, has_model, model = part.strip().partition("=")
        for slot, judge in judged_by.items():
            if judge is None:
                continue  # that judge did not score the row: no column to inflate
            same = model == judge if has_model else _SELECTOR_SLOT.get(name) == slot
            if same:
                inflated.update(m.column for m in slot_metrics(slot))
    return inflated


def all_candidates_column(column: str) -> str | None:
    """The per-row mean over all candidates to show beside `column` (e.g. clip_score ->
    candidate_clip_mean), or None when the scoring stage keeps none for it."""
    metric = METRIC_BY_COLUMN.get(column)
    return metric.candidate_column if metric is not None else None
