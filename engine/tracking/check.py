"""Which experiment trackers can run here: checked before a run or search starts, so a missing
package is one line, not a failure after hours of work."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

from engine.errors import UserError

TRACKERS = {"mlflow": "mlflow"}  # tracker -> the package it needs


def check_trackers(names: Sequence[str], where: str = "--track") -> None:
    for name in names:
        if name not in TRACKERS:
            raise UserError(f"{where} {name}: unknown tracker; trackers: {', '.join(TRACKERS)}")
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise UserError(f"{where} {name} needs the {TRACKERS[name]} package: pip install -e \".[tracking]\"")
