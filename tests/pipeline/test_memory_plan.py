"""The plan of model memory and disk (engine plan's `models per node` lines) and the check engine
run makes before it starts: a model_memory below one model, or downloads the disk cannot hold."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

import engine.models.loading
from engine.cli import app
from engine.errors import UserError
from engine.models.budget import GB
from engine.models.footprint import SD1_DOWNLOAD_BYTES, model_footprint
from engine.pipeline import memory_plan
from engine.pipeline.grid import expand_run
from engine.pipeline.memory_plan import check_run_fits, plan_memory
from engine.specs.runs import ModelSpec, run_spec_from_dict

runner = CliRunner()


@pytest.fixture(autouse=True)
def offline_and_no_loads(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError("planning loaded a model")

    monkeypatch.setattr(engine.models.loading, "load_base_pipeline", refuse)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from engine.models.builtin import build_tiny

    folder = tmp_path_factory.mktemp("m") / "tiny"
    build_tiny().save_pretrained(folder, safe_serialization=True)
    return folder


def _grid(tmp_path, models, **extra):
    spec = run_spec_from_dict({"output": str(tmp_path / "out"), "models": models, "concepts": ["church"],
                               "probes": ["standard_prompt"], "num_images": 2, "judges": [], **extra}, "test")
    return expand_run(spec, strict=False)


def test_a_folder_is_sized_from_its_safetensors_headers(tiny_folder):
    from engine.models.budget import module_bytes
    from engine.models.builtin import build_tiny

    pipe = build_tiny()
    footprint = model_footprint(ModelSpec(name="t", pretrained=str(tiny_folder)), itemsize=4)
    loaded = {c: module_bytes(getattr(pipe, c)) for c in ("unet", "vae", "text_encoder")}
    # Exact but for buffers a module makes itself (the text encoder's position ids are not saved).
    assert footprint.memory.keys() == loaded.keys()
    assert all(abs(footprint.memory[c] - loaded[c]) <= 0.01 * loaded[c] for c in loaded)
    assert model_footprint(ModelSpec(name="t", pretrained=str(tiny_folder)), itemsize=2).memory_bytes * 2 == \
        footprint.memory_bytes and footprint.download_bytes == 0


def test_a_missing_hub_model_offline_costs_the_sd1_default(tmp_path):
    footprint = model_footprint(ModelSpec(name="x", pretrained="nobody/missing"), itemsize=2)
    assert footprint.source == "default (SD 1.x)" and footprint.download_bytes == SD1_DOWNLOAD_BYTES
    assert 2.0 * GB < footprint.memory_bytes < 2.2 * GB  # SD 1.x in fp16


def test_model_memory_below_one_model_is_refused_before_the_run(tmp_path, tiny_folder):
    grid = _grid(tmp_path, [str(tiny_folder)], model_memory=0.001, device="cpu")
    with pytest.raises(UserError, match=r"model_memory 0.001 GB cannot hold tiny .*at least 0.01"):
        check_run_fits(grid)
    check_run_fits(_grid(tmp_path, [str(tiny_folder)], model_memory=0.1, device="cpu"))
    result = runner.invoke(app, ["run", "--model", str(tiny_folder), "--concept", "church", "--probe",
                                 "standard_prompt", "--num-images", "1", "--output", str(tmp_path / "o"),
                                 "--set", "model_memory=0.001", "--set", "judges=[]"])
    assert result.exit_code != 0 and "cannot hold tiny" in result.output
    assert not (tmp_path / "o" / "rows").exists()


def test_downloads_the_disk_cannot_hold_stop_the_run_unless_unchecked(tmp_path, monkeypatch):
    monkeypatch.setattr(memory_plan, "free_disk", lambda folder: 10 * GB)
    models = [f"org/erased-{i}" for i in range(4)]
    grid = _grid(tmp_path, models)
    plan = plan_memory(grid, actors=2)
    assert plan.downloads == 4 and plan.download_bytes == 4 * SD1_DOWNLOAD_BYTES and plan.disk_fits is False
    with pytest.raises(UserError, match="--no-space-check"):
        check_run_fits(grid)
    check_run_fits(_grid(tmp_path, models, space_check=False))
    # keep_downloads false: only the models in use and two ahead per actor stay on disk.
    slim = plan_memory(_grid(tmp_path, [f"org/erased-{i}" for i in range(20)], keep_downloads=False), actors=1)
    assert slim.disk_needed == 3 * SD1_DOWNLOAD_BYTES


def test_plan_counts_loads_per_actor_and_the_peak_under_the_budget(tmp_path):
    models = [f"org/erased-{i}" for i in range(12)]
    plan = plan_memory(_grid(tmp_path, models, model_memory=5.0, batch_size=1), actors=3)
    assert 12 <= plan.loads <= 12 + 2 * 2
    assert all(0 < a.peak_bytes <= 5 * GB for a in plan.actors)
    assert max(a.peak_bytes for a in plan.actors) > 4 * GB  # two 2.1 GB models fit, three do not


def test_engine_plan_prints_memory_loads_downloads_and_disk(paper_plan_output):
    out = paper_plan_output
    assert "model memory per actor: budget 48.00 GB" in out and "model loads:" in out
    assert "downloads:" in out and "hub cache" in out


def test_hub_listing_counts_only_the_files_the_load_reads(monkeypatch):
    """The listing's shape, stubbed (the hub itself cannot be reached from the tests)."""
    import huggingface_hub

    from engine.models.footprint import hub_listing_bytes

    class Sibling:
        def __init__(self, rfilename, size):
            self.rfilename, self.size = rfilename, size

    files = {"model_index.json": 1, "sd-v1-4.ckpt": 4_000, "v1-4.safetensors": 4_000,
             "unet/diffusion_pytorch_model.safetensors": 300, "unet/diffusion_pytorch_model.fp16.safetensors": 150,
             "unet/diffusion_pytorch_model.bin": 300, "unet/config.json": 1,
             "vae/diffusion_pytorch_model.safetensors": 30,
             "text_encoder/model.safetensors": 50, "tokenizer/vocab.json": 2, "safety_checker/model.safetensors": 120}

    class Api:
        def model_info(self, repo_id, revision=None, files_metadata=False):
            assert files_metadata
            return type("Info", (), {"siblings": [Sibling(n, b) for n, b in files.items()]})()

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    assert hub_listing_bytes("org/model", None) == 1 + 300 + 1 + 30 + 50 + 2
