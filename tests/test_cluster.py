"""`engine run --cluster ADDRESS` on a multi-node Ray cluster (ray.cluster_utils.Cluster): a node
joins before the run and one is removed mid-run; every row arrives exactly once."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from engine.results import read_rows


@pytest.fixture
def cluster():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 2})
    yield cluster
    cluster.shutdown()


def test_run_survives_losing_a_node(cluster, tmp_path):
    doomed = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    output = tmp_path / "out"
    command = [
        sys.executable, "-m", "engine.cli", "run", "--cluster", cluster.address,
        "--model", "tiny", "--concept", "church", "--concept", "tench", "--probe", "standard_prompt",
        "--num-images", "4", "--batch-size", "1", "--output", str(output),
        "--probe-param", "standard_prompt.num_inference_steps=8", "--set", "actors=2",
    ]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # Remove the extra node as soon as the first rows land, while the rest are in flight.
    deadline = time.time() + 240
    while time.time() < deadline and not list((output / "rows").glob("*.parquet")):
        if process.poll() is not None:
            break
        time.sleep(0.5)
    assert process.poll() is None, "the run finished before a node could be removed mid-run"
    cluster.remove_node(doomed)
    out, _ = process.communicate(timeout=400)
    assert process.returncode == 0, out[-3000:]
    rows = read_rows(output).column("row_id").to_pylist()
    assert len(rows) == 8 and len(set(rows)) == 8
