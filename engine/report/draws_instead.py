"""What erased models draw instead: per (method, erased concept), the judge's most frequent top-1
classes on the baseline probe's recovery rows (the plain prompt, by the probe fact `baseline`),
with their shares, beside the base model's on the same concept.

Read from `judge_top5_classes` (the first is the top-1 class), which classifier judges store for
every judged row; class indices are named by the judge's class list when it has one.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pandas as pd

from engine.metrics.columns import TOP5_CLASSES
from engine.probe import BASE, RECOVERY, baseline_probes
from engine.report.tables import BASE_METHOD, method_order, present_values

TOP_SHOWN = 3  # classes named per cell


def class_namer(frame: pd.DataFrame) -> Callable[..., str]:
    """(index, concept) -> readable class name: the frame's classifier judge's class list
    (`judge_model` is `<judge>:...`), or, for rows ranked by the CLIP judge alone, the members of the
    row's concept set by name (engine.scoring.clip_judge.set_members)."""
    from engine.scoring.registry import JUDGE_REGISTRY, get_judge_class

    models = present_values(frame["judge_model"]) if "judge_model" in frame else []
    judge = str(models[0]).split(":", 1)[0] if models else None
    names = None
    if judge in JUDGE_REGISTRY:
        names = getattr(get_judge_class(judge), "class_names", lambda: None)()

    def name(index: int, concept: str | None = None) -> str:
        members = names
        if members is None and not models and concept is not None:
            from engine.specs.concepts import concept_set_members, load_concept

            members = sorted(concept_set_members(load_concept(concept)))
        return members[index] if members is not None and 0 <= index < len(members) else f"class {index}"

    return name


def top1_of(classes) -> int | None:
    """The top-1 class of one row's `judge_top5_classes` value (None when the row has none)."""
    if classes is None or (isinstance(classes, float) and pd.isna(classes)) or not len(classes):
        return None
    return int(next(iter(classes)))


def top1_classes(rows: pd.DataFrame) -> list[int]:
    return [c for c in (top1_of(v) for v in rows[TOP5_CLASSES].tolist()) if c is not None]


def shares(classes: list[int], name: Callable[..., str], concept: str) -> str:
    """"square 50%, circle 25%, ..." for the TOP_SHOWN most frequent classes."""
    if not classes:
        return "–"
    counts = Counter(classes).most_common(TOP_SHOWN)
    return ", ".join(f"{name(index, concept)} {100 * count / len(classes):.0f}%" for index, count in counts)


def draws_instead_table(frame: pd.DataFrame) -> pd.DataFrame:
    """One line per (method, erased concept): n, what the erased models' plain-prompt images show
    (top-1 classes with shares) and what the base model's show on the same concept."""
    columns = ["method", "concept", "n", "erased models draw", "base n", "base model draws"]
    if TOP5_CLASSES not in frame or not frame[TOP5_CLASSES].notna().any():
        return pd.DataFrame(columns=columns)
    baseline = baseline_probes(frame["probe"].unique())
    plain = frame[frame["probe"].isin(baseline)]
    recovery = plain[plain["role"] == RECOVERY]
    base = plain[(plain["role"] == BASE) & (plain["method"] == BASE_METHOD)]
    name = class_namer(frame)
    records = []
    for method in [m for m in method_order(recovery["method"]) if m != BASE_METHOD]:
        method_rows = recovery[recovery["method"] == method]
        for concept in sorted(method_rows["concept"].unique()):
            drawn = top1_classes(method_rows[method_rows["concept"] == concept])
            reference = top1_classes(base[base["concept"] == concept])
            if not drawn:
                continue
            records.append({"method": method, "concept": concept, "n": len(drawn),
                            "erased models draw": shares(drawn, name, concept), "base n": len(reference),
                            "base model draws": shares(reference, name, concept)})
    return pd.DataFrame.from_records(records, columns=columns)
