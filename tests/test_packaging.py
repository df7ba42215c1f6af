"""Installable anywhere: the shipped configs are package data found through importlib.resources, the
catalog commands say where each entry came from, the wheel works from a fresh virtual environment
outside the repository, and the deployment files (deploy/) hold the fields they rely on."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import types
import zipfile
from pathlib import Path

import pytest
import ray
import yaml
from typer.testing import CliRunner

from engine.cli import app
from engine.results import read_rows
from engine.specs.files import SHIPPED, config_sources, find_config_entries, find_config_files, shipped_config_dir

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
REAL_CONCEPTS = {
    "airliner", "cassette_player", "chainsaw", "church", "english_springer_spaniel", "french_horn",
    "garbage_truck", "golf_ball", "parachute", "tench", "van_gogh", "picasso", "andy_warhol",
}
TOY_CONCEPTS = {"toy_bars", "toy_circle", "toy_cross", "toy_diamond", "toy_ring", "toy_square", "toy_star",
                "toy_triangle"}
CONCEPT = "kind: object\ndisplay_name: {0}\nprompt: a picture of a {0}\nclip_text: a photo of a {0}\nseeds: [1]\n"


# --------------------------------------------------------------------------- config folders


def test_shipped_configs_are_the_configs_package():
    import configs

    assert configs.ENGINE_SHIPPED_CONFIGS
    assert shipped_config_dir() == Path(configs.__file__).parent == ROOT / "configs"


def test_a_foreign_configs_package_is_not_taken_for_the_shipped_one(monkeypatch):
    monkeypatch.setitem(sys.modules, "configs", types.ModuleType("configs"))  # some other project's
    assert shipped_config_dir() == ROOT / "configs"  # the source tree's folder stands in


def _write_concept(folder: Path, name: str, prompt_word: str) -> None:
    (folder / "concepts").mkdir(parents=True, exist_ok=True)
    (folder / "concepts" / f"{name}.yaml").write_text(CONCEPT.format(prompt_word))


def test_env_folders_then_local_configs_then_shipped(tmp_path, monkeypatch):
    env_dir, work = tmp_path / "team-configs", tmp_path / "work"
    _write_concept(env_dir, "church", "chapel")  # shadows the shipped church
    _write_concept(work / "configs", "church", "cathedral")  # shadowed by the env folder
    _write_concept(work / "configs", "lighthouse", "lighthouse")
    monkeypatch.chdir(work)
    monkeypatch.setenv("ENGINE_CONFIG_DIR", str(env_dir))
    assert [label for _, label in config_sources()] == [f"$ENGINE_CONFIG_DIR {env_dir}", "./configs", SHIPPED]
    entries = find_config_entries("concepts")
    assert entries["church"].path == env_dir / "concepts" / "church.yaml"
    assert entries["church"].source == f"$ENGINE_CONFIG_DIR {env_dir}"
    assert entries["lighthouse"].source == "./configs"
    assert entries["tench"].source == SHIPPED
    assert find_config_files("concepts")["church"] == entries["church"].path


def test_running_inside_the_repository_labels_its_configs_shipped(monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("ENGINE_CONFIG_DIR", raising=False)
    assert config_sources() == [(ROOT / "configs", SHIPPED)]


def test_catalog_commands_say_where_each_entry_came_from(tmp_path, monkeypatch):
    _write_concept(tmp_path / "configs", "lighthouse", "lighthouse")
    (tmp_path / "configs" / "models").mkdir()
    (tmp_path / "configs" / "models" / "my_esd.yaml").write_text("pretrained: someone/esd-church\nmethod: esd-x\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ENGINE_CONFIG_DIR", raising=False)
    runner = CliRunner()
    concepts = runner.invoke(app, ["concepts"])
    assert concepts.exit_code == 0, concepts.output
    source = {line.split()[0]: line.split()[-1] for line in concepts.output.splitlines()}
    assert source["lighthouse"] == "./configs" and source["church"] == SHIPPED
    models = runner.invoke(app, ["models"])
    assert models.exit_code == 0, models.output
    lines = {line.split()[0]: line for line in models.output.splitlines()}
    assert lines["tiny"].endswith("built-in") and lines["sd14"].endswith(SHIPPED)
    assert "someone/esd-church" in lines["my_esd"] and lines["my_esd"].endswith("./configs")


# --------------------------------------------------------------------------- the wheel


def _copy_sources(target: Path) -> None:
    """What the wheel is built from; a copy keeps build/ and *.egg-info out of the checkout."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, target / name)
    for package in ("engine", "probes", "classifier_training", "configs"):
        shutil.copytree(ROOT / package, target / package, ignore=ignore)


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, f"{command}\n{(done.stdout + done.stderr)[-3000:]}"
    return done


@pytest.mark.slow
def test_wheel_installed_in_a_fresh_venv_lists_concepts_and_runs(tmp_path):
    source, dist, venv, outside = (tmp_path / name for name in ("src", "dist", "venv", "elsewhere"))
    for folder in (source, outside):
        folder.mkdir()
    _copy_sources(source)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
          str(source)], timeout=300)
    [wheel] = dist.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {f"configs/concepts/{c}.yaml" for c in REAL_CONCEPTS | TOY_CONCEPTS} <= set(names)
    assert {"configs/models/sd14.yaml", "configs/runs/example.yaml", "configs/tune/noise_based.yaml"} <= set(names)
    shipped_weights = {n for n in names if n.startswith("engine/toyworld/weights/")}
    in_repo = {p.relative_to(ROOT).as_posix() for p in (ROOT / "engine/toyworld/weights").rglob("*") if p.is_file()}
    assert shipped_weights == in_repo
    # The deployment recipes install the wheel by this pattern.
    assert fnmatch.fnmatch(wheel.name, "erasure_probe_engine-*.whl")

    # A fresh venv that sees the test environment's packages through a plain path entry: .pth files
    # there (the editable install of the checkout among them) are not processed, so it cannot leak in.
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], timeout=120)
    python = venv / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (site / "test_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
          str(wheel)], timeout=300)

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ENGINE_CONFIG_DIR")}
    env.update(HF_HUB_OFFLINE="1", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    where = _run([str(python), "-c", "import engine, probes, configs; print(engine.__file__); print(probes.__file__);"
                  "print(configs.__file__)"], cwd=outside, env=env).stdout.split()
    assert all(Path(p).is_relative_to(venv) for p in where), where

    concepts = _run([str(venv / "bin" / "engine"), "concepts"], cwd=outside, env=env, timeout=300).stdout
    listed = {line.split()[0]: line.split()[-1] for line in concepts.splitlines()}
    assert set(listed) == REAL_CONCEPTS | TOY_CONCEPTS and set(listed.values()) == {SHIPPED}

    output = outside / "out"
    _run([str(venv / "bin" / "engine"), "run", "--model", "tiny", "--concept", "church", "--probe", "standard_prompt",
          "--num-images", "1", "--output", str(output), "--probe-param", "standard_prompt.num_inference_steps=2"],
         cwd=outside, env=env, timeout=480)
    rows = read_rows(output)
    assert rows.num_rows == 1 and rows.column("concept").to_pylist() == ["church"]


# --------------------------------------------------------------------------- deploy/


def _ray_image_tag() -> str:
    return f"{ray.__version__}-py311-gpu"  # the engine needs Python 3.11; Ray refuses mixed versions


def test_cluster_launcher_config_fits_rays_schema_and_installs_the_wheel():
    import jsonschema

    config = yaml.safe_load((DEPLOY / "ray-cluster.yaml").read_text())
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)  # Ray's own schema for `ray up` files
    assert isinstance(config["cluster_name"], str) and config["provider"]["type"]
    node_types = config["available_node_types"]
    assert config["head_node_type"] in node_types
    assert all(isinstance(node["resources"], dict) for node in node_types.values())
    gpu_types = [name for name, node in node_types.items() if node["resources"].get("GPU", 0) >= 1]
    assert gpu_types and all(node_types[name].get("min_workers", 0) >= 1 for name in gpu_types)
    assert config["docker"]["image"] == f"rayproject/ray:{_ray_image_tag()}"
    installs = [c for c in config["setup_commands"] if "pip install" in c]
    [mount] = [target for target, local in config["file_mounts"].items() if local.rstrip("/") == "./dist"]
    assert any(f"{mount}/erasure_probe_engine-*.whl" in command for command in installs), installs


def test_cluster_launcher_schema_check_catches_a_misspelled_key():
    import jsonschema

    config = yaml.safe_load((DEPLOY / "ray-cluster.yaml").read_text())
    config["head_node_typ"] = config.pop("head_node_type")
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, schema)


def test_kuberay_manifest_has_a_gpu_worker_group_on_the_engine_image():
    manifest = yaml.safe_load((DEPLOY / "kuberay-cluster.yaml").read_text())
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayCluster"
    assert manifest["metadata"]["name"]
    spec = manifest["spec"]
    assert spec["rayVersion"] == ray.__version__
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    [head_container] = head["template"]["spec"]["containers"]
    images = {head_container["image"]}
    gpu_groups = 0
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"] and isinstance(group["rayStartParams"], dict)
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        for container in group["template"]["spec"]["containers"]:
            images.add(container["image"])
            limits = container["resources"]["limits"]
            if int(limits.get("nvidia.com/gpu", 0)) >= 1:
                gpu_groups += 1
                assert container["resources"].get("requests", limits).get("nvidia.com/gpu") == limits["nvidia.com/gpu"]
    assert gpu_groups >= 1
    assert len(images) == 1, images  # head and workers run the same engine image


def test_dockerfile_builds_the_wheel_and_installs_it_on_the_ray_gpu_image():
    text = (DEPLOY / "Dockerfile").read_text()
    [ray_version] = re.findall(r"^ARG RAY_VERSION=(\S+)$", text, re.M)
    assert ray_version == ray.__version__
    stages = re.findall(r"^FROM (\S+)(?: AS (\S+))?$", text, re.M)
    assert stages[-1][0].replace("${RAY_VERSION}", ray_version) == f"rayproject/ray:{_ray_image_tag()}"
    build_stage = text.split("\nFROM ")[1]
    for copied in ("pyproject.toml", "README.md", "engine", "probes", "classifier_training", "configs"):
        assert re.search(rf"^COPY .*\b{copied}\b", build_stage, re.M), copied
    assert "pip wheel --no-deps" in build_stage
    final_stage = text.split("\nFROM ")[-1]
    assert re.search(r"^COPY --from=wheel ", final_stage, re.M)
    assert re.search(r"pip install .*\n?.*erasure_probe_engine-\*\.whl", final_stage)


def test_readme_deploying_section_links_every_deploy_file():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Deploying", 1)[1].split("\n## ", 1)[0]
    for name in ("Dockerfile", "ray-cluster.yaml", "kuberay-cluster.yaml"):
        assert f"(deploy/{name})" in section, name
        assert (DEPLOY / name).is_file()
