"""Content identities of pipeline components: per-tensor hashes of local folders (cached beside the
folder, or in the engine's cache when it is read-only), hub blob names, and the budget setting."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from engine.errors import UserError
from engine.models import sharing
from engine.models.sharing import HASH_FILE, component_identities, safetensors_digest
from engine.specs.runs import run_spec_from_dict


def _pipeline_folder(root, text_seed: int, unet_seed: int):
    """A pipeline-shaped folder: unet/, vae/, text_encoder/ with one safetensors file each, tokenizer/."""
    for component, seed in (("unet", unet_seed), ("vae", 7), ("text_encoder", text_seed)):
        folder = root / component
        folder.mkdir(parents=True)
        generator = torch.Generator().manual_seed(seed)
        save_file({"weight": torch.randn(4, 4, generator=generator)}, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps({"size": 4}))
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "vocab.json").write_text('{"a": 0}')
    return root


def test_equal_components_have_equal_identities_and_others_differ(tmp_path):
    a = component_identities(_pipeline_folder(tmp_path / "a", text_seed=1, unet_seed=1))
    b = component_identities(_pipeline_folder(tmp_path / "b", text_seed=1, unet_seed=2))
    c = component_identities(_pipeline_folder(tmp_path / "c", text_seed=3, unet_seed=1))
    assert set(a) == {"unet", "vae", "text_encoder", "tokenizer"}
    assert a["vae"] == b["vae"] == c["vae"] and a["tokenizer"] == b["tokenizer"]
    assert a["text_encoder"] == b["text_encoder"] != c["text_encoder"]
    assert a["unet"] != b["unet"] and a["unet"] == c["unet"]


def test_tensor_hash_ignores_metadata_but_not_values(tmp_path):
    tensor = {"w": torch.arange(6.0).reshape(2, 3)}
    save_file(tensor, str(tmp_path / "x.safetensors"), metadata={"format": "pt"})
    save_file(tensor, str(tmp_path / "y.safetensors"), metadata={"saved_by": "someone else"})
    save_file({"w": torch.arange(6.0).reshape(3, 2)}, str(tmp_path / "z.safetensors"))
    assert safetensors_digest(tmp_path / "x.safetensors") == safetensors_digest(tmp_path / "y.safetensors")
    assert safetensors_digest(tmp_path / "x.safetensors") != safetensors_digest(tmp_path / "z.safetensors")


def test_hashes_are_cached_beside_the_folder_and_redone_when_a_file_changes(tmp_path, monkeypatch):
    folder = _pipeline_folder(tmp_path / "m", 1, 1)
    first = component_identities(folder)
    assert (folder / HASH_FILE).exists()
    calls = []
    real = sharing.safetensors_digest
    monkeypatch.setattr(sharing, "safetensors_digest", lambda p: calls.append(p) or real(p))
    assert component_identities(folder) == first and calls == []  # read from the cache file
    save_file({"weight": torch.zeros(4, 4)}, str(folder / "unet" / "model.safetensors"))
    second = component_identities(folder)
    assert [p.name for p in calls] == ["model.safetensors"] and second["unet"] != first["unet"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_keeps_its_hashes_in_the_engine_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path / "engine-cache"))
    folder = _pipeline_folder(tmp_path / "ro", 1, 1)
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    try:
        component_identities(folder)
        assert not (folder / HASH_FILE).exists()
        assert list((tmp_path / "engine-cache" / "content-hashes").glob("*.json"))
    finally:
        for path in [folder, *folder.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)


def test_read_only_fallback_when_the_folder_cannot_be_written(tmp_path, monkeypatch):
    """The same fallback, forced (root ignores permissions): writing beside the folder fails."""
    monkeypatch.setenv("ENGINE_CACHE_DIR", str(tmp_path / "engine-cache"))
    folder = _pipeline_folder(tmp_path / "ro", 1, 1)
    real_write = type(folder).write_text

    def refuse_beside(path, *args, **kwargs):
        if path.parent == folder.resolve():
            raise PermissionError("read-only")
        return real_write(path, *args, **kwargs)

    monkeypatch.setattr(type(folder), "write_text", refuse_beside)
    component_identities(folder)
    assert not (folder / HASH_FILE).exists()
    assert list((tmp_path / "engine-cache" / "content-hashes").glob("*.json"))


def test_hub_snapshots_are_identified_by_blob_names_without_reading(tmp_path, monkeypatch):
    """Two hub repos whose text encoder files link to the same blob share it; nothing is hashed."""
    blobs = tmp_path / "models--org--a" / "blobs"
    source = _pipeline_folder(tmp_path / "src", 1, 1)
    snapshots = {}
    for repo, unet_blob in (("a", "u1"), ("b", "u2")):
        root = tmp_path / f"models--org--{repo}"
        (root / "blobs").mkdir(parents=True, exist_ok=True)
        snapshot = root / "snapshots" / "0123"
        for component in ("unet", "vae", "text_encoder"):
            (snapshot / component).mkdir(parents=True)
            for name in ("model.safetensors", "config.json"):
                blob = unet_blob + name if component == "unet" else f"{component}-{name}-sha"
                shutil.copy(source / component / name, root / "blobs" / blob)
                (snapshot / component / name).symlink_to(os.path.relpath(root / "blobs" / blob, snapshot / component))
        snapshots[repo] = snapshot
    monkeypatch.setattr(sharing, "safetensors_digest", lambda p: pytest.fail("hashed a hub file"))
    monkeypatch.setattr(sharing, "file_digest", lambda p: pytest.fail("hashed a hub file"))
    a, b = component_identities(snapshots["a"]), component_identities(snapshots["b"])
    assert a["text_encoder"] == b["text_encoder"] and a["vae"] == b["vae"] and a["unet"] != b["unet"]
    assert blobs.exists() and not (snapshots["a"] / HASH_FILE).exists()


@pytest.mark.parametrize("value", [0, -1, "lots", True, float("inf")])
def test_model_memory_must_be_positive_gb_or_auto(value):
    with pytest.raises(UserError, match="model_memory"):
        run_spec_from_dict({"output": "o", "concepts": ["church"], "probes": ["standard_prompt"], "num_images": 1,
                            "model_memory": value}, "test")
    spec = run_spec_from_dict({"output": "o", "concepts": ["church"], "probes": ["standard_prompt"],
                               "num_images": 1, "model_memory": 2.5}, "test")
    assert spec.model_memory == 2.5 and spec.space_check and spec.keep_downloads
