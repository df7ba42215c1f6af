"""`engine run --track wandb` (or `tracking: [wandb]` in a run file): one W&B run per engine run.

Offline by default: nothing leaves the machine unless WANDB_MODE=online (with WANDB_API_KEY or
`wandb login`); an offline run is a folder under ./wandb (WANDB_DIR to move it) that `wandb sync
FOLDER` uploads later. The project is WANDB_PROJECT or `erasure-probe-engine` (WANDB_ENTITY picks
the team). It logs the run record (engine.tracking.run_record): the resolved config as the W&B
config, with the manifest's tags under `engine_run`; the counts and the recovery table's values as
the run's summary; the report folder as a `report` artifact. The run is named after the output folder.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, cast, get_args

from engine.errors import UserError

if TYPE_CHECKING:  # the CLI imports this module to check WANDB_MODE; the record's pandas only when logging
    from engine.tracking.run_record import RunRecord

Mode = Literal["offline", "online", "disabled", "shared"]  # what wandb.init takes

PROJECT = "erasure-probe-engine"
_NOT_IN_ARTIFACT_NAMES = re.compile(r"[^A-Za-z0-9_\-.]")


@dataclass(frozen=True)
class WandbTarget:
    """Where W&B runs go, resolved on the driver (Ray Tune's logging actors run in trial folders)."""

    project: str
    mode: Mode  # WANDB_MODE; offline unless it says otherwise
    folder: str  # absolute; W&B writes its `wandb/` folder in it: WANDB_DIR or the working folder


def wandb_target(project_suffix: str = "") -> WandbTarget:
    """The target the environment asks for; an unknown WANDB_MODE is a user error (checked before a run)."""
    mode = os.environ.get("WANDB_MODE") or "offline"
    if mode not in get_args(Mode):
        raise UserError(f"WANDB_MODE={mode}: unknown mode; modes: {', '.join(get_args(Mode))}")
    return WandbTarget(project=os.environ.get("WANDB_PROJECT") or PROJECT + project_suffix, mode=cast(Mode, mode),
                       folder=str(Path(os.environ.get("WANDB_DIR") or ".").resolve()))


def log_run(record: RunRecord) -> str:
    """Log the run record as one W&B run; returns the line to print (where an offline run is)."""
    import wandb

    target = wandb_target()
    # The engine prints its own line. Silent in the global settings too: W&B's terminal lines (e.g.
    # "Adding directory to artifact") follow those, not the run's.
    wandb.setup(settings=wandb.Settings(silent=True))
    settings = wandb.Settings(silent=True, console="off")  # console off: no capture of the engine's output
    run = wandb.init(project=target.project, name=record.name, job_type="engine-run", mode=target.mode,
                     dir=target.folder, config={**record.config, "engine_run": record.tags}, settings=settings)
    try:
        run.summary.update(record.metrics)
        artifact = wandb.Artifact(_NOT_IN_ARTIFACT_NAMES.sub("_", f"report-{record.name}"), type="report")
        artifact.add_dir(str(record.report_dir))
        run.log_artifact(artifact)
        folder = Path(run.dir).parent  # run.dir is the run folder's files/
        where = (f"{run.url}" if target.mode == "online" else
                 f"{folder} (offline; upload with `wandb sync {folder}`)")
        return f"logged to W&B: run {run.id}, {where}"
    finally:
        run.finish()
