"""Every model source: built-in, local folder, UNet override (folder and file), hub id offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.errors import UserError
from engine.models.cache import ModelCache
from engine.models.resolve import resolve_model, unet_override_spec
from engine.probe import row_generator
from engine.specs.runs import ModelSpec


def _image(pipe, seed=3):
    out = pipe("a picture of a church", generator=row_generator(seed), num_inference_steps=2, output_type="np")
    return out.images[0]


@pytest.fixture(scope="module")
def saved_folders(tmp_path_factory, tiny_pipe, tiny_erased_pipe):
    root = tmp_path_factory.mktemp("models")
    tiny_pipe.save_pretrained(root / "tiny")
    tiny_erased_pipe.unet.save_pretrained(root / "erased-unet")
    tiny_erased_pipe.save_pretrained(root / "erased-full")
    from safetensors.torch import save_file

    save_file(tiny_erased_pipe.unet.state_dict(), str(root / "erased.safetensors"))
    torch.save(tiny_erased_pipe.unet.state_dict(), root / "erased.pt")
    return root


def test_builtin_tiny_is_seeded_and_reproducible(tiny_pipe):
    from engine.models.builtin import build_tiny

    again = build_tiny()
    for (name, a), (_, b) in zip(tiny_pipe.unet.state_dict().items(), again.unet.state_dict().items(), strict=False):
        assert torch.equal(a, b), name
    assert tiny_pipe.safety_checker is None


def test_local_folder_loads_and_matches(saved_folders, tiny_pipe):
    spec = resolve_model(str(saved_folders / "tiny"))
    assert spec.pretrained == str(saved_folders / "tiny")
    pipe = ModelCache(torch.device("cpu")).pipeline(spec)
    np.testing.assert_array_equal(_image(pipe), _image(tiny_pipe))


@pytest.mark.parametrize("override", ["erased-unet", "erased-full", "erased.safetensors"])
def test_unet_override_uses_erased_unet_on_base_components(saved_folders, tiny_erased_pipe, override):
    spec = unet_override_spec(str(saved_folders / override), base_model=str(saved_folders / "tiny"))
    cache = ModelCache(torch.device("cpu"))
    pipe = cache.pipeline(spec)
    base = cache.pipeline(resolve_model(str(saved_folders / "tiny")))
    assert pipe.text_encoder is base.text_encoder and pipe.vae is base.vae  # shared, loaded once
    assert pipe.unet is not base.unet
    np.testing.assert_array_equal(_image(pipe), _image(tiny_erased_pipe))


def test_pickle_weights_refused_unless_allowed(saved_folders):
    with pytest.raises(UserError, match="allow-pickle"):
        unet_override_spec(str(saved_folders / "erased.pt"), base_model=str(saved_folders / "tiny"))
    spec = ModelSpec(name="p", pretrained=str(saved_folders / "tiny"), unet=str(saved_folders / "erased.pt"),
                     allow_pickle=True)
    pipe = ModelCache(torch.device("cpu")).pipeline(spec)
    assert pipe.unet is not None


def test_pickle_only_pipeline_folder_refused(tmp_path, tiny_pipe):
    tiny_pipe.save_pretrained(tmp_path / "p", safe_serialization=False)
    with pytest.raises(UserError, match="pickle"):
        resolve_model(str(tmp_path / "p"))


def test_missing_and_unknown_models_fail_clearly(tmp_path):
    with pytest.raises(UserError, match="model folder not found"):
        resolve_model(str(tmp_path / "nope"))
    with pytest.raises(UserError, match=r"unknown model 'tinyy'.*tiny"):
        resolve_model("tinyy")
    with pytest.raises(UserError, match="not a diffusers pipeline folder"):
        resolve_model(str(tmp_path))


def test_uncached_hub_id_fails_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="not in the local Hugging Face cache"):
        resolve_model("nobody-here/no-such-model")


def test_hub_id_loads_from_cache_layout_offline(saved_folders, tmp_path):
    """A saved pipeline placed in the HF cache layout loads by its hub id with HF_HUB_OFFLINE=1."""
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--test-org--tiny-sd"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.parent.mkdir(parents=True)
    import shutil

    shutil.copytree(saved_folders / "tiny", snapshot)
    script = textwrap.dedent(
        """
        import json, torch
        from engine.models.cache import ModelCache
        from engine.models.resolve import resolve_model
        from engine.probe import row_generator
        spec = resolve_model("test-org/tiny-sd")
        pipe = ModelCache(torch.device("cpu")).pipeline(spec)
        out = pipe("a picture of a church", generator=row_generator(3), num_inference_steps=2, output_type="np")
        print(json.dumps({"name": spec.name, "sum": float(out.images[0].sum())}))
        """
    )
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["name"] == "test-org/tiny-sd"
    from engine.models.builtin import build_tiny

    expected = float(_image(build_tiny()).sum())
    assert loaded["sum"] == pytest.approx(expected, rel=1e-5)


def test_xformers_on_cpu_is_a_clear_error(tiny_pipe):
    from engine.models.loading import set_attention

    with pytest.raises(UserError, match="xformers"):
        set_attention(tiny_pipe, "xformers", torch.device("cpu"))
    assert Path  # keep import used
