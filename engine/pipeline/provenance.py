"""Where a run's results came from, for its manifest: the command line and the exact weights of
every model (the hub commit a hub id resolved to, not the `revision: null` the user wrote)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

from engine.models.builtin import BUILTIN_MODELS
from engine.models.resolve import HUB_ID
from engine.specs.runs import ModelSpec


def command_line(argv: list[str] | None = None) -> str:
    """The command as the user typed it (as far as the process can tell)."""
    argv = list(sys.argv if argv is None else argv)
    if argv and Path(argv[0]).name == "__main__.py" and Path(argv[0]).parent.name == "cli":
        argv[0:1] = ["python", "-m", "engine.cli"]
    elif argv:
        argv[0] = Path(argv[0]).name
    return shlex.join(argv)


def hub_commit(repo_id: str, revision: str | None) -> str | None:
    """The commit `repo_id` at `revision` resolves to in this machine's hub cache: the name of the
    snapshot folder. None when it is not cached here. Never touches the network."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True)).name
    except Exception:  # noqa: BLE001 - not cached (or no such revision): no commit to report
        return None


def model_source(spec: ModelSpec) -> dict[str, Any]:
    """What the pipeline of `spec` is built from: {source, revision, commit, reason}; `commit` is
    null with a `reason` when there is no hub commit to name."""
    source = spec.pretrained
    entry: dict[str, Any] = {"source": source, "revision": spec.revision, "commit": None, "reason": None}
    if source in BUILTIN_MODELS:
        entry["reason"] = "built-in model: weights made in code or shipped with the engine"
    elif HUB_ID.match(source) and not Path(source).expanduser().exists():
        entry["commit"] = hub_commit(source, spec.revision)
        if entry["commit"] is None:
            entry["reason"] = "not in this machine's hub cache (loaded on another node, or the revision is unknown)"
    else:
        entry["reason"] = "local folder: no hub commit"
    if spec.unet is not None:
        entry["unet"] = {"path": spec.unet, "reason": "local UNet override: no hub commit"}
    return entry
