"""The experiment trackers a run or search can log to, each described once; and the check, before
a run or search starts, that the ones asked for can run here (a missing package is one line, not a
failure after hours of work)."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, get_args

from engine.errors import UserError
from engine.specs.runs import Tracker
from engine.tracking.wandb_run import wandb_target

if TYPE_CHECKING:
    from engine.tracking.run_record import RunRecord


@dataclass(frozen=True)
class TrackerKind:
    package: str  # what must be installed
    title: str  # the name a person knows it by
    hint: str  # where to look when logging fails
    module: str  # the engine module whose log_run(record) logs a finished run (imported when used)

    def log_run(self) -> Callable[[RunRecord], str]:
        return importlib.import_module(self.module).log_run


TRACKERS = {
    "mlflow": TrackerKind("mlflow", "MLflow", "check MLFLOW_TRACKING_URI", "engine.tracking.mlflow_run"),
    "wandb": TrackerKind("wandb", "W&B", "check WANDB_MODE, WANDB_DIR and, online, WANDB_API_KEY",
                         "engine.tracking.wandb_run"),
}
assert set(TRACKERS) == set(get_args(Tracker)), "every tracker a spec accepts is described here"


def check_trackers(names: Sequence[str], where: str = "--track") -> None:
    for name in names:
        if name not in TRACKERS:
            raise UserError(f"{where} {name}: unknown tracker; trackers: {', '.join(TRACKERS)}")
        package = TRACKERS[name].package
        if importlib.util.find_spec(package) is None:
            raise UserError(f"{where} {name} needs the {package} package: pip install -e \".[tracking]\"")
    if "wandb" in names:
        wandb_target()  # WANDB_MODE is one W&B knows
