"""engine.report.selection: a score column picked by the model that judges it is selection-inflated."""

from __future__ import annotations

import pytest

from engine.metrics.columns import MODEL_COLUMNS, slot_metrics
from engine.report.selection import _SELECTOR_SLOT, all_candidates_column, selection_inflated

CLIP = "clip:ViT-B-32/openai"
RESNET = "imagenet:resnet50/IMAGENET1K_V2"
JUDGE_COLUMNS = {"judge_top1", "judge_top5", "judge_target_prob"}


@pytest.mark.parametrize(
    "selector, judge_model, clip_model, inflated",
    [
        # The default: CLIP selects, CLIP judges -> the kept image's CLIP score is the best of N CLIP scores.
        (f"clip={CLIP}", RESNET, CLIP, {"clip_score"}),
        # The original's way: the classifier that judges also selected.
        (f"judge={RESNET}", RESNET, CLIP, JUDGE_COLUMNS),
        # Rescored later with another CLIP: nothing was chosen by the judging model.
        ("clip=clip:ViT-L-14/openai", RESNET, CLIP, set()),
        # A selector that is no judge, no selector, keep-all rows.
        ("latent_classifier=latent_classifier:church:0123456789ab", RESNET, CLIP, set()),
        ("none", RESNET, CLIP, set()),
        (None, RESNET, CLIP, set()),
        ("", RESNET, CLIP, set()),
        # Several selectors in one batch (joined by "+"): each inflates its own judge's columns.
        (f"clip={CLIP}+judge={RESNET}", RESNET, CLIP, {"clip_score"} | JUDGE_COLUMNS),
        # A judge that did not score the row has no column to inflate.
        (f"clip={CLIP}", RESNET, None, set()),
        (f"judge={RESNET}", None, CLIP, set()),
        # The toy world's judge selecting and judging.
        ("judge=toy:judge-0123", "toy:judge-0123", None, JUDGE_COLUMNS),
        # A selector recorded without its model (e.g. read from params): by name, if that judge scored.
        ("clip", RESNET, CLIP, {"clip_score"}),
        ("judge", RESNET, None, JUDGE_COLUMNS),
        ("latent_classifier", RESNET, CLIP, set()),
    ],
)
def test_selection_inflated(selector, judge_model, clip_model, inflated):
    assert selection_inflated(selector, judge_model, clip_model) == inflated


def test_columns_and_selector_slots_are_the_engines():
    from engine.scoring.selectors import FALLBACK, SELECTOR_SLOTS

    assert _SELECTOR_SLOT == {**SELECTOR_SLOTS, FALLBACK: "clip"}  # judge selection fallen back to CLIP
    assert selection_inflated(f"{FALLBACK}=clip:m", "j", "clip:m") == {m.column for m in slot_metrics("clip")}
    assert MODEL_COLUMNS == {"clip": "clip_model", "classifier": "judge_model"}  # the two models it compares
    assert selection_inflated("clip", "x", "y") == {m.column for m in slot_metrics("clip")}
    assert selection_inflated("judge", "x", "y") == {m.column for m in slot_metrics("classifier")}


def test_all_candidates_mean_beside_each_inflatable_column():
    assert all_candidates_column("clip_score") == "candidate_clip_mean"
    assert all_candidates_column("judge_top1") == "candidate_top1_rate"
    assert all_candidates_column("judge_top5") == "candidate_top5_rate"
    assert all_candidates_column("judge_target_prob") is None
