"""Where the warm local Ray of `engine up` is (engine.pipeline.warm): its state file, read by every run
without --cluster (engine.pipeline.ray_start) before it starts a Ray of its own. Apart from warm.py so
that reading the file needs nothing of what starts and holds that Ray."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

STATE_FILE = "local-ray.json"


def state_path() -> Path:
    folder = os.environ.get("ENGINE_STATE_DIR") or Path.home() / ".cache" / "erasure-probe-engine"
    return Path(folder) / STATE_FILE


def process_alive(pid: int) -> bool:
    """Whether process `pid` is still running (ours to signal)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process took the pid over
        return False
    return True


def warm_state() -> dict[str, Any] | None:
    """The warm Ray's state ({address, pid, host, dashboard_url, started_at}) when its holder is alive on
    this machine; a stale file is removed."""
    path = state_path()
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if state.get("host") != socket.gethostname() or not process_alive(int(state.get("pid", -1))):
        path.unlink(missing_ok=True)
        return None
    return state


def warm_address() -> str | None:
    state = warm_state()
    return None if state is None else str(state["address"])
