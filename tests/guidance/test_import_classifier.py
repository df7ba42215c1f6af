"""`engine import-classifier`: a `.pt` written here in the original code's layout (its
LatentClassifierT state-dict names, the checkpoint dict with numpy metrics) converts to the
engine's files and gives the original architecture's logits; anything that is not a weights-only
checkpoint of that network is refused with one line; hub ids resolve from the local cache."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from torch import nn
from typer.testing import CliRunner

from engine.cli import app
from engine.guidance.latent_classifier_io import load_classifier
from engine.guidance.original_classifier import ORIGINAL_TO_ENGINE
from engine.models.builtin import _sd_scheduler_config

ALPHAS = DDIMScheduler(**_sd_scheduler_config()).alphas_cumprod
runner = CliRunner()


class OriginalTimeEncoding(nn.Module):
    """The original's time encoding: the scheduler's alpha-bar table as a buffer, e(t) = [sqrt, sqrt(1 - .)]."""

    def __init__(self, alphas_cumprod):
        super().__init__()
        self.register_buffer("alphas_cumprod", alphas_cumprod)

    def forward(self, t):
        alpha_bar = self.alphas_cumprod[t]
        return torch.stack([alpha_bar.sqrt(), (1 - alpha_bar).sqrt()], dim=-1)


class OriginalLatentClassifier(nn.Module):
    """The original's network as its reference notes describe it, under its state-dict names:
    fc_x(flatten(z)) + fc_t(e(t)), then SiLU, dropout 0.3, 1024 -> 512, SiLU, dropout 0.3, 512 -> 1."""

    def __init__(self, latent_shape=(4, 64, 64), alphas_cumprod=ALPHAS):
        super().__init__()
        self.t_embed = OriginalTimeEncoding(alphas_cumprod)
        self.fc_t = nn.Linear(2, 1024)
        self.fc_x = nn.Linear(int(np.prod(latent_shape)), 1024)
        self.net = nn.Sequential(nn.SiLU(), nn.Dropout(0.3), nn.Linear(1024, 512), nn.SiLU(), nn.Dropout(0.3),
                                 nn.Linear(512, 1))

    def forward(self, z, t):
        return self.net(self.fc_x(z.flatten(start_dim=1)) + self.fc_t(self.t_embed(t)))


def write_original_checkpoint(path, latent_shape=(4, 64, 64), seed=0):
    """A checkpoint as the original's training script saves its best epoch."""
    torch.manual_seed(seed)
    model = OriginalLatentClassifier(latent_shape)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-3)
    loss = model(torch.randn(2, *latent_shape), torch.tensor([10, 900])).sum()
    loss.backward()
    optimizer.step()  # a real optimizer state, as the original stores it
    torch.save({"epoch": 3, "model_state_dict": model.state_dict(), "optimizer_state_dict": optimizer.state_dict(),
                "val_loss": 12.5, "pr_auc": np.float64(0.71), "roc_auc": np.float64(0.85),
                "tpr5": np.float64(0.52)}, path)
    return model.eval()


def test_the_reference_network_has_the_originals_state_dict_names():
    assert set(OriginalLatentClassifier((4, 8, 8)).state_dict()) == set(ORIGINAL_TO_ENGINE)
    assert sum(p.numel() for p in OriginalLatentClassifier().parameters()) == pytest.approx(17.3e6, rel=0.01)


def test_imported_classifier_gives_the_originals_logits(tmp_path):
    original = write_original_checkpoint(tmp_path / "church.pt")
    result = runner.invoke(app, ["import-classifier", str(tmp_path / "church.pt"), "--output-dir", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    assert "church" in result.output and "logits match" in result.output
    model, config = load_classifier(tmp_path / "c", "church")
    assert model.latent_shape == (4, 64, 64) and model.hidden_size == 1024
    assert config["architecture"]["dropout"] == 0.3
    # A fixed input other than the importer's own check: latents at several noise levels, all timesteps' ends.
    generator = torch.Generator().manual_seed(123)
    latents = torch.randn(6, 4, 64, 64, generator=generator) * torch.tensor([0.2, 0.5, 1, 1, 2, 3]).view(-1, 1, 1, 1)
    timesteps = torch.tensor([0, 1, 250, 500, 981, 999])
    with torch.no_grad():
        expected = original(latents, timesteps).squeeze(-1)
        torch.testing.assert_close(model(latents, timesteps), expected, rtol=1e-5, atol=1e-5)
    assert config["imported_from"]["checkpoint"] == {"epoch": 3, "val_loss": 12.5, "pr_auc": 0.71,
                                                     "roc_auc": 0.85, "tpr5": 0.52}
    assert config["logit_check"]["max_abs_difference"] < 1e-4
    assert config["data"]["model"]["pretrained"] == "CompVis/stable-diffusion-v1-4"
    assert config["alphas_cumprod"] == pytest.approx([float(a) for a in ALPHAS])


class NotWeights:
    """Unpickling this would import and run code from this module: never allowed."""


def test_other_files_are_refused_with_one_line(tmp_path):
    torch.save({"model_state_dict": {}, "extra": NotWeights()}, tmp_path / "church.pt")
    result = runner.invoke(app, ["import-classifier", str(tmp_path / "church.pt"), "--output-dir", str(tmp_path)])
    assert result.exit_code == 2 and "refused, not a weights-only torch checkpoint" in result.output
    (tmp_path / "garbage.pt").write_bytes(pickle.dumps(["not", "torch"]))
    result = runner.invoke(app, ["import-classifier", str(tmp_path / "garbage.pt"), "--concept", "church",
                                 "--output-dir", str(tmp_path)])
    assert result.exit_code == 2 and "refused" in result.output
    torch.save({"model_state_dict": {"weight": torch.zeros(2)}}, tmp_path / "airliner.pt")
    result = runner.invoke(app, ["import-classifier", str(tmp_path / "airliner.pt"), "--output-dir", str(tmp_path)])
    assert result.exit_code == 2 and "not the original's latent classifier" in result.output
    write_original_checkpoint(tmp_path / "church_church_building.pt", (4, 8, 8))
    result = runner.invoke(app, ["import-classifier", str(tmp_path / "church_church_building.pt"),
                                 "--output-dir", str(tmp_path)])
    assert result.exit_code == 2 and "unknown concept" in result.output  # the original's e2e file name
    assert not list(tmp_path.glob("*.safetensors"))
    result = runner.invoke(app, ["import-classifier", "someone/else", "--output-dir", str(tmp_path)])
    assert result.exit_code == 2 and "neither a .pt file nor a hub id" in result.output


def test_hub_ids_resolve_through_the_local_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hf"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    args = ["import-classifier", "DiffusionConceptErasure/latent-classifier-airliner", "--output-dir", str(tmp_path)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "not found in the local Hugging Face cache" in result.output
    # The cache layout huggingface_hub reads: refs/main -> snapshots/<commit>/<file>, the original's file name.
    repo = cache / "models--DiffusionConceptErasure--latent-classifier-airliner"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    original = write_original_checkpoint(repo / "snapshots" / commit / "airliner.pt", (4, 8, 8), seed=5)
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    model, _ = load_classifier(tmp_path, "airliner")
    latents, timesteps = torch.randn(3, 4, 8, 8), torch.tensor([5, 400, 990])
    with torch.no_grad():
        torch.testing.assert_close(model(latents, timesteps), original(latents, timesteps).squeeze(-1),
                                   rtol=1e-5, atol=1e-5)
    assert json.loads((tmp_path / "airliner.json").read_text())["imported_from"]["source"] == args[1]
