"""How tables name a best-of-N probe's rows: `noise_based (best of 24 by CLIP)`, its control
`noise_based control (best of 24 by CLIP)`, a sweep that stopped at its first judged hit
`noise_based (first hit in coverage order, 1-24 candidates made; ...)`, and what a probe without a
control of its own compares with.
"""

from __future__ import annotations

import json
import re

import pandas as pd

from engine.probe import probe_fact
from engine.report.selection import selector_names
from engine.report.tables import present_values, probe_of_label


def is_control(params_texts) -> bool:
    return any(json.loads(text).get("control") == "only" for text in params_texts)


def stops_on_hit(params_texts) -> bool:
    """Whether these rows' sweeps stopped at their first judged hit (`stop: on_hit`, engine.best_of_n_stop)."""
    return any(json.loads(text).get("stop") == "on_hit" for text in params_texts)


def display_label(label: str, group: pd.DataFrame) -> str:
    """`label` (a probe label) with the control named and, for rows that chose among candidates, how
    many and by which selector(s); other labels unchanged."""
    probe = probe_of_label(label)
    control = is_control(group["params"].unique())
    # `noise_based[control=only eta=...]` -> `noise_based control[eta=...]`; `control=off` is the probe itself.
    text = re.sub(r"\s*control=(off|only)\s*", " ", label).replace("[ ", "[").replace(" ]", "]").replace("[]", "")
    if control:
        text = probe + " control" + text[len(probe):]
    counts = sorted({int(c) for c in present_values(group["candidate_count"])})
    if not counts or not probe_fact(probe, "best_of_n", False):
        return text.strip()
    n = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    selectors = selector_names([str(v) for v in present_values(group["selector"])]) or ["?"]
    if stops_on_hit(group["params"].unique()):
        # The kept image of a stopped prompt is the judge's first hit, not the selector's best: say so.
        return f"{text.strip()} (first hit in coverage order, {n} candidates made; {' / '.join(selectors)})"
    return f"{text.strip()} (best of {n} by {' / '.join(selectors)})"


def display_labels(rows: pd.DataFrame) -> dict[str, str]:
    """probe_label -> its display label, over every method's rows (one label per table line)."""
    return {label: display_label(label, group) for label, group in rows.groupby("probe_label", sort=False)}


def control_notes(probes) -> list[str]:
    """Per best-of-N probe without a control of its own, what its control is (its class's `control_note`)."""
    return [f"{name}: {note}" for name in sorted(set(probes))
            if probe_fact(name, "best_of_n", False) and (note := probe_fact(name, "control_note", None))]
