"""The score metrics, declared once.

Every per-image score a judge writes is one Metric here: its row column, which judge slot fills it,
whether it is a rate (share of True) or a mean, how its 95% interval is computed, and how tables
show it. Results (the Arrow schema), the scorer, reports, plots, Tune objectives and the CLI all
read this table, so adding a metric means adding one line here and filling the column in the
judge of its slot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

JudgeSlot = Literal["clip", "classifier"]
IntervalMethod = Literal["wilson", "clopper_pearson", "student_t"]

# Per judge slot, the row column naming the judge model that filled its metrics.
MODEL_COLUMNS: dict[str, str] = {"clip": "clip_model", "classifier": "judge_model"}


@dataclass(frozen=True)
class Metric:
    column: str  # per-row score column, written by the judge of `slot`
    slot: JudgeSlot
    kind: Literal["rate", "mean"]  # rate: share of True over images; mean: mean of a float
    interval: IntervalMethod
    label: str  # table and plot label
    key: str  # prefix of its statistics columns: <key>_rate / <key>_mean, <key>_ci_low, <key>_ci_high
    scale: float = 1.0  # display scale: rates are shown in %
    digits: int = 2  # decimals shown
    candidate_column: str | None = None  # per-row mean over a best-of-N row's candidates, if kept
    plotted: bool = True
    bounds: tuple[float, float] | None = None  # a mean's possible range: its t interval is clipped to it

    @property
    def value(self) -> str:
        """The statistics column holding the cell's value (rate or mean)."""
        return f"{self.key}_{self.kind}"

    @property
    def ci_low(self) -> str:
        return f"{self.key}_ci_low"

    @property
    def ci_high(self) -> str:
        return f"{self.key}_ci_high"

    @property
    def hits(self) -> str | None:
        return f"{self.key}_hits" if self.kind == "rate" else None

    @property
    def arrow_kind(self) -> Literal["bool", "float"]:
        return "bool" if self.kind == "rate" else "float"


METRICS: tuple[Metric, ...] = (
    Metric("clip_score", "clip", "mean", "student_t", "CLIP", "clip", candidate_column="candidate_clip_mean"),
    Metric("judge_top1", "classifier", "rate", "wilson", "top-1 %", "top1", 100.0, 1, "candidate_top1_rate"),
    Metric("judge_top5", "classifier", "rate", "wilson", "top-5 %", "top5", 100.0, 1, "candidate_top5_rate"),
    Metric("judge_target_prob", "classifier", "mean", "student_t", "target prob.", "target_prob", digits=3,
           plotted=False, bounds=(0.0, 1.0)),
)
METRIC_BY_COLUMN: dict[str, Metric] = {m.column: m for m in METRICS}
SCORE_COLUMNS: tuple[str, ...] = tuple(m.column for m in METRICS)
CANDIDATE_COLUMNS: tuple[str, ...] = tuple(m.candidate_column for m in METRICS if m.candidate_column)

# Best-of-N rows: every candidate's judge hit (list<bool>, candidate order) under HIT_METRIC's rule
# (the classifier judge's top-1), so reports read a row three ways: the kept candidate, the mean over
# candidates (one sample) and "some candidate was recognised" (the upper bound). Filled by the
# scoring stage, recomputed or cleared by `engine score`; the same rule as ProbeContext.judge_hits.
CANDIDATE_HITS = "candidate_hits"
HIT_METRIC = "judge_top1"
# Every judged row: the judge's five most probable classes (indices into its class list; for a CLIP
# judge, indices into the row's concept set as the run lists it) and their probabilities, most
# probable first: what the model drew, whatever it was asked for.
TOP5_CLASSES = "judge_top5_classes"
TOP5_PROBS = "judge_top5_probs"


def metric(column: str) -> Metric:
    return METRIC_BY_COLUMN[column]


def slot_metrics(slot: str) -> list[Metric]:
    return [m for m in METRICS if m.slot == slot]
