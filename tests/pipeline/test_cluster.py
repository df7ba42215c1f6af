"""`engine run --cluster ADDRESS` on a multi-node Ray cluster (ray.cluster_utils.Cluster): a node
joins before the run and one is removed mid-run; every row arrives exactly once. A local output
path is written by tasks on the driver's node only."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from engine.pipeline.sink import writer_info
from engine.results import parquet_files, read_manifest, read_rows


def _command(cluster, output, *extra) -> list[str]:
    return [
        sys.executable, "-m", "engine.cli", "run", "--cluster", cluster.address,
        "--model", "tiny", "--concept", "church", "--concept", "tench", "--probe", "standard_prompt",
        "--batch-size", "1", "--output", str(output), *extra,
    ]


ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}


@pytest.mark.slow
def test_run_survives_losing_a_node_and_writes_its_local_output_on_the_drivers_node(tmp_path):
    """The driver's node (the head) has no CPU, so every task that reserves one runs on the two
    other nodes, one of which is removed once the first rows land; every row arrives once, and the
    results files are all written by tasks on the driver's node. (One cluster for both facts: a
    cluster start and a run fewer.)"""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 0})
    try:
        kept = cluster.add_node(num_cpus=2)
        doomed = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        output = tmp_path / "out"
        command = _command(cluster, output, "--num-images", "4", "--probe-param",
                           "standard_prompt.num_inference_steps=8", "--set", "actors=2")
        process = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        # Remove a node as soon as the first rows land, while the rest are in flight.
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
        # Losing a node is not a row's fault: no failed rows; the manifest counts what Ray redid.
        manifest = read_manifest(output)
        faults = manifest["faults"]
        assert faults["failed_rows"] == 0 and faults["oom_splits"] == 0
        assert {"unit_retries", "actor_restarts"} <= faults.keys()
        storage = manifest["storage"]
        assert storage["writes_on_driver_node"] is True
        assert storage["driver_node"] == cluster.head_node.node_id not in {kept.node_id, doomed.node_id}
        writers = [writer_info(output, name)["node_id"] for name in parquet_files(output)]
        assert writers and set(writers) == {storage["driver_node"]}
    finally:
        cluster.shutdown()
