"""A warm local Ray for small runs: `engine up` starts one that later `engine run` / `engine tune`
commands on this machine attach to by themselves; `engine down` stops it.

A small run spends seconds starting a local Ray (GCS, raylet, its agents and first workers) and shutting
it down again. `engine up` starts a detached process that holds a local Ray (`ray.init(address="local")`,
no dashboard unless asked) and writes its address and pid to `local-ray.json` in the engine's state folder
(`$ENGINE_STATE_DIR`, else ~/.cache/erasure-probe-engine). A run without `--cluster` finds the file, checks
that the process is alive, and connects to that Ray instead of starting its own (engine.pipeline.ray_start);
it is still a one-machine run (no code shipped, outputs and caches local). `engine down` sends the holder
SIGTERM: it shuts its Ray down (the processes that Ray started, no other Ray on the machine) and removes
the file. A file whose process is gone (a reboot, a kill) is ignored and removed. Tests set
ENGINE_STATE_DIR to a folder of their own, so they always keep their own Ray.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from engine.errors import UserError
from engine.pipeline.warm_state import STATE_FILE, process_alive, state_path, warm_address, warm_state

logger = logging.getLogger(__name__)
__all__ = ["STATE_FILE", "serve", "start", "state_path", "stop", "warm_address", "warm_state"]

START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 60.0


def start(dashboard: bool = False) -> dict[str, Any]:
    """Start the holder process and wait until its Ray is up; the state it wrote. Already up: its state."""
    state = warm_state()
    if state is not None:
        return {**state, "already_running": True}
    path = state_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    log = path.with_suffix(".log")
    command = [sys.executable, "-m", "engine.pipeline.warm", "--serve", *(["--dashboard"] if dashboard else [])]
    # The engine this command runs (a checkout, or the installed one) is the one the holder imports.
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in [root, os.environ.get("PYTHONPATH")] if p)}
    with open(log, "w") as out:
        # Its own session: the holder outlives this command and a Ctrl-C in the shell that ran it.
        holder = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  start_new_session=True, env=env)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        state = warm_state()
        if state is not None and state.get("pid") == holder.pid:
            return state
        if holder.poll() is not None:
            raise UserError(f"engine up: the local Ray did not start (exit code {holder.returncode}); see {log}")
        time.sleep(0.2)
    holder.terminate()
    raise UserError(f"engine up: the local Ray did not start within {START_TIMEOUT_S:.0f} s; see {log}")


def stop() -> dict[str, Any] | None:
    """SIGTERM to the holder, then wait until it is gone; the state it had, or None when none was up."""
    state = warm_state()
    if state is None:
        return None
    pid = int(state["pid"])
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if process_alive(pid):
        raise UserError(f"engine down: the warm Ray's holder (pid {pid}) is still running after "
                        f"{STOP_TIMEOUT_S:.0f} s; stop it with: kill {pid}")
    state_path().unlink(missing_ok=True)
    return state


def serve(dashboard: bool) -> None:
    """The holder: a local Ray kept until SIGTERM, its address in the state file."""
    import ray

    from engine.pipeline.ray_start import worker_env

    os.environ.update({k: v for k, v in worker_env().items() if k not in os.environ})
    context = ray.init(address="local", include_dashboard=dashboard, log_to_driver=False,
                       logging_level=logging.WARNING)
    dashboard_url = getattr(context, "dashboard_url", None) or None

    def shut_down(signum, frame) -> None:
        ray.shutdown()
        state_path().unlink(missing_ok=True)
        sys.exit(0)

    signal.signal(signal.SIGTERM, shut_down)
    state = {"address": context.address_info["gcs_address"], "pid": os.getpid(), "host": socket.gethostname(),
             "dashboard_url": dashboard_url, "started_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    temporary = state_path().with_suffix(".tmp")
    temporary.write_text(json.dumps(state))
    temporary.replace(state_path())  # whole or absent: a run never reads half a file
    while True:
        signal.pause()


if __name__ == "__main__" and "--serve" in sys.argv:
    serve("--dashboard" in sys.argv)
