"""Which experiment trackers can run here: checked before a run or search starts, so a missing
package is one line, not a failure after hours of work."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import get_args

from engine.errors import UserError
from engine.specs.runs import Tracker
from engine.tracking.wandb_run import wandb_target

TRACKERS = {"mlflow": "mlflow", "wandb": "wandb"}  # tracker -> the package it needs
assert set(TRACKERS) == set(get_args(Tracker)), "every tracker a spec accepts names its package here"


def check_trackers(names: Sequence[str], where: str = "--track") -> None:
    for name in names:
        if name not in TRACKERS:
            raise UserError(f"{where} {name}: unknown tracker; trackers: {', '.join(TRACKERS)}")
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise UserError(f"{where} {name} needs the {TRACKERS[name]} package: pip install -e \".[tracking]\"")
    if "wandb" in names:
        wandb_target()  # WANDB_MODE is one W&B knows
