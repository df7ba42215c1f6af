"""Code shipping to cluster workers (engine.pipeline.shipping): what goes into runtime_env py_modules,
the per-node version check, and a run on a multi-node ray.cluster_utils.Cluster whose workers import
`engine` and `probes` from the shipped copy under Ray's runtime-resources folder."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from ray import cloudpickle

import engine
from engine.pipeline.grid import expand_run
from engine.pipeline.shipping import (
    SHIPPED_PACKAGES,
    NodeEngine,
    code_runtime_env,
    mismatch_lines,
    origin_reporter,
    should_ship,
    uses_toy_weights,
)
from engine.results import read_rows
from engine.specs.runs import run_spec_from_dict

ROOT = Path(__file__).resolve().parents[2]


def test_ships_by_default_only_to_an_existing_cluster():
    assert should_ship("127.0.0.1:6379", None) is True
    assert should_ship("auto", None) is True
    assert should_ship(None, None) is False  # the local Ray the engine starts runs this interpreter
    assert should_ship("auto", False) is False
    assert should_ship(None, True) is True


def _plan(models, concepts, judges):
    return expand_run(run_spec_from_dict({"output": "unused", "models": models, "concepts": concepts,
                                        "probes": ["standard_prompt"], "num_images": 1, "judges": judges}))


def test_toy_weights_travel_only_when_a_toy_model_or_the_toy_judge_is_used():
    assert not uses_toy_weights(_plan(["tiny"], ["church"], ["clip:tiny"]))
    assert uses_toy_weights(_plan(["toy-esdx-circle"], ["toy_circle"], ["clip:tiny"]))
    assert uses_toy_weights(_plan(["tiny"], ["toy_circle"], ["toy"]))


def _packaged_names(folder: str, excludes: list[str], tmp_path: Path) -> list[str]:
    """The files Ray's own packager (as py_modules uses it) puts in the zip sent to the cluster."""
    from ray._private.runtime_env.packaging import create_package

    target = tmp_path / f"{Path(folder).name}-{len(list(tmp_path.glob('*.zip')))}.zip"
    create_package(folder, target, include_gitignore=True, include_parent_dir=True, excludes=excludes)
    return zipfile.ZipFile(target).namelist()


def test_runtime_env_ships_the_four_packages_and_drops_unused_weights(tmp_path):
    env = code_runtime_env(toy_weights=False)
    folders = {Path(p).name: Path(p) for p in env["py_modules"]}
    assert sorted(folders) == sorted(SHIPPED_PACKAGES)
    assert all((folder / "__init__.py").is_file() for folder in folders.values())

    without = _packaged_names(str(folders["engine"]), env["excludes"], tmp_path)
    assert "engine/pipeline/shipping.py" in without
    assert not [n for n in without if "toyworld/weights" in n or "__pycache__" in n]
    with_weights = _packaged_names(str(folders["engine"]), code_runtime_env(toy_weights=True)["excludes"], tmp_path)
    assert "engine/toyworld/weights/judge.safetensors" in with_weights
    assert "engine/toyworld/weights/toy-base/unet/diffusion_pytorch_model.safetensors" in with_weights
    shipped_configs = _packaged_names(str(folders["configs"]), env["excludes"], tmp_path)
    assert "configs/concepts/church.yaml" in shipped_configs and "configs/tune/noise_based.yaml" in shipped_configs


def test_mismatch_lines_name_each_differing_node_once():
    reports = [
        NodeEngine("10.0.0.1", engine.__version__, "/a/engine/__init__.py", "/a/probes/__init__.py"),
        NodeEngine("10.0.0.2", "0.0.1", "/opt/engine/__init__.py", "/opt/probes/__init__.py"),
        NodeEngine("10.0.0.3", None, None, None, "ModuleNotFoundError: No module named 'engine'"),
    ]
    lines = mismatch_lines(engine.__version__, reports, shipped=False)
    assert lines == [
        f"worker node 10.0.0.2 runs engine 0.0.1 from /opt/engine/__init__.py; the driver runs {engine.__version__}"
        "; --ship-code sends the driver's",
        "worker node 10.0.0.3 cannot import the engine (ModuleNotFoundError: No module named 'engine'); "
        "--ship-code sends the driver's",
    ]
    assert mismatch_lines(engine.__version__, reports[:1], shipped=True) == []


def test_version_check_runs_where_the_engine_is_not_installed(tmp_path):
    """The check travels by value, so a node without the engine runs it and says what is missing.
    Stand-in for such a node: the base interpreter seeing the test environment's packages as a plain
    path (its .pth files, among them the engine's editable install, are not processed)."""
    reporter = origin_reporter()
    here = reporter()
    assert here["version"] == engine.__version__ and here["engine_file"] == engine.__file__
    payload = tmp_path / "reporter.pkl"
    payload.write_bytes(cloudpickle.dumps(reporter))
    site_packages = sysconfig.get_paths()["purelib"]
    script = (f"import sys; sys.path.append({site_packages!r}); import pickle; "
              f"print(pickle.loads(open({str(payload)!r}, 'rb').read())())")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys._base_executable, "-S", "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "'version': None" in done.stdout and "No module named 'engine'" in done.stdout


@pytest.fixture
def cluster():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()


@pytest.mark.slow
def test_cluster_workers_import_the_shipped_engine_and_the_run_writes_every_row(cluster, tmp_path):
    # Started from a folder outside the repository: Ray puts the driver's working folder on the
    # workers' sys.path, and the repository's engine/ there would shadow the shipped copy.
    output = tmp_path / "out"
    command = [
        sys.executable, "-m", "engine.cli", "run", "--cluster", cluster.address, "--verbose",
        "--model", "tiny", "--concept", "church", "--probe", "standard_prompt", "--num-images", "2",
        "--batch-size", "1", "--output", str(output), "--probe-param", "standard_prompt.num_inference_steps=2",
    ]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=480)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    nodes = [line for line in out.splitlines() if "imports engine" in line]
    assert len(nodes) == 2, out[-3000:]  # head and worker node
    for line in nodes:
        engine_file, probes_file = line.split(" from ")[1].split(" and probes")[0], line.split(" from ")[2]
        for path in (engine_file, probes_file):
            assert "runtime_resources" in path and not path.startswith(str(ROOT)), line
        # A tiny-model run ships the engine without the toy-world weights.
        assert not (Path(engine_file).parent / "toyworld" / "weights").exists()
    assert not [line for line in out.splitlines() if "worker node" in line and line not in nodes]  # no mismatch
    rows = read_rows(output).column("row_id").to_pylist()
    assert len(rows) == 2 and len(set(rows)) == 2
