"""`engine up` / `engine down`: a warm local Ray that a later `engine run` attaches to, stopped again;
the state file's rules without starting anything."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from engine.pipeline import warm

ROOT = Path(__file__).resolve().parents[2]


def test_a_state_file_whose_holder_is_gone_is_ignored_and_removed(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGINE_STATE_DIR", str(tmp_path))
    assert warm.warm_address() is None and warm.stop() is None  # nothing up: nothing to stop
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone = int(done.stdout)
    warm.state_path().write_text(json.dumps({"address": "127.0.0.1:1", "pid": gone, "host": socket.gethostname()}))
    assert warm.warm_address() is None and not warm.state_path().exists()
    alive = {"address": "127.0.0.1:2", "pid": os.getpid(), "host": socket.gethostname()}
    warm.state_path().write_text(json.dumps(alive))
    assert warm.warm_address() == "127.0.0.1:2"
    warm.state_path().write_text(json.dumps({**alive, "host": "another-machine"}))
    assert warm.warm_address() is None


def _engine(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_engine_up_then_run_attaches_and_down_stops_it(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ENGINE_STATE_DIR": str(tmp_path / "state")}
    env.pop("RAY_ADDRESS", None)
    up = _engine("up", env=env)
    assert up.returncode == 0, up.stdout + up.stderr
    state = json.loads((tmp_path / "state" / warm.STATE_FILE).read_text())
    try:
        assert "warm local Ray started" in up.stdout
        run = _engine("run", "--model", "tiny", "--concept", "church", "--probe", "standard_prompt", "--num-images",
                      "1", "--probe-param", "standard_prompt.num_inference_steps=2", "--set", "judges=[]",
                      "--output", str(tmp_path / "out"), env=env)
        assert run.returncode == 0, run.stdout + run.stderr
        assert f"the warm local Ray at {state['address']}" in run.stderr
        assert "1 rows generated" in run.stdout
        os.kill(state["pid"], 0)  # the run disconnected; the warm Ray is still up
        assert "already running" in _engine("up", env=env).stdout
    finally:
        down = _engine("down", env=env)
    assert down.returncode == 0 and f"stopped the warm local Ray at {state['address']}" in down.stdout
    assert not (tmp_path / "state" / warm.STATE_FILE).exists()
    with pytest.raises(ProcessLookupError):
        os.kill(state["pid"], 0)
    assert "no warm local Ray" in _engine("down", env=env).stdout
