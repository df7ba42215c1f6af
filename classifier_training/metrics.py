"""Validation metrics of a binary classifier, in numpy: ROC-AUC, PR-AUC, TPR at a fixed FPR.

Small and dependency-free (no scikit-learn). `labels` are 0/1, `scores` any real numbers where
higher means "more likely the concept"; ties between scores are handled exactly.
"""

from __future__ import annotations

import numpy as np


def _check(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).astype(np.float64).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"labels and scores differ in length ({labels.size} vs {scores.size})")
    if not np.isin(labels, (0.0, 1.0)).all():
        raise ValueError("labels must be 0 or 1")
    return labels, scores


def roc_curve(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) at every distinct threshold, from (0, 0) (threshold above every score) to (1, 1).
    Tied scores move together, so a tie is one diagonal segment, never a staircase."""
    labels, scores = _check(labels, scores)
    order = np.argsort(-scores, kind="mergesort")
    labels, scores = labels[order], scores[order]
    # The last index of each run of equal scores: thresholds between distinct values.
    ends = np.r_[np.flatnonzero(np.diff(scores)), labels.size - 1]
    true_positives = np.cumsum(labels)[ends]
    false_positives = (ends + 1) - true_positives
    positives, negatives = labels.sum(), labels.size - labels.sum()
    tpr = np.r_[0.0, true_positives / positives] if positives else np.full(ends.size + 1, np.nan)
    fpr = np.r_[0.0, false_positives / negatives] if negatives else np.full(ends.size + 1, np.nan)
    return fpr, tpr


def roc_auc(labels, scores) -> float:
    """Area under the ROC curve = P(score of a random positive > score of a random negative), ties
    counting one half (Mann-Whitney U / (n_pos * n_neg), with average ranks). NaN with one class."""
    labels, scores = _check(labels, scores)
    positives = int(labels.sum())
    negatives = labels.size - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = _average_ranks(scores)
    rank_sum = ranks[labels == 1].sum()
    return float((rank_sum - positives * (positives + 1) / 2) / (positives * negatives))


def pr_auc(labels, scores) -> float:
    """Area under the precision-recall curve as average precision: sum over distinct thresholds of
    (recall step) x (precision there); no interpolation between points. NaN without positives."""
    labels, scores = _check(labels, scores)
    if labels.sum() == 0:
        return float("nan")
    order = np.argsort(-scores, kind="mergesort")
    labels, scores = labels[order], scores[order]
    ends = np.r_[np.flatnonzero(np.diff(scores)), labels.size - 1]
    true_positives = np.cumsum(labels)[ends]
    precision = true_positives / (ends + 1)
    recall = true_positives / labels.sum()
    recall_steps = np.diff(np.r_[0.0, recall])
    return float((recall_steps * precision).sum())


def tpr_at_fpr(labels, scores, target_fpr: float = 0.05) -> float:
    """TPR at the ROC point whose FPR is closest to `target_fpr` (as the original reports it);
    among points equally close, the highest TPR (the best threshold at that FPR)."""
    fpr, tpr = roc_curve(labels, scores)
    if np.isnan(fpr).any() or np.isnan(tpr).any():
        return float("nan")
    distance = np.abs(fpr - target_fpr)
    closest = np.isclose(distance, distance.min(), rtol=0.0, atol=1e-12)
    return float(tpr[closest].max())


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their ranks."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    ranks = np.empty(values.size, dtype=np.float64)
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_values)) + 1]
    ends = np.r_[starts[1:], values.size]
    for start, end in zip(starts, ends, strict=False):
        ranks[order[start:end]] = (start + 1 + end) / 2.0
    return ranks


def binary_metrics(labels, logits, target_fpr: float = 0.05) -> dict[str, float]:
    """The validation metrics reported each epoch."""
    return {
        "roc_auc": roc_auc(labels, logits),
        "pr_auc": pr_auc(labels, logits),
        "tpr_at_5_fpr": tpr_at_fpr(labels, logits, target_fpr),
    }
