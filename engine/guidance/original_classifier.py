"""The original code's latent classifiers (`<concept>.pt`) converted to the engine's files.

The authors publish their classifiers as `DiffusionConceptErasure/latent-classifier-<concept>` on
the Hugging Face hub: a torch checkpoint dict whose `model_state_dict` holds their LatentClassifierT,
the same network as engine.guidance.latent_classifier under other names:

    original                  engine
    t_embed.alphas_cumprod    alphas_cumprod      (buffer: the scheduler's alpha-bar table)
    fc_x.weight / .bias       latent_in.*         (flattened latent -> 1024)
    fc_t.weight / .bias       time_in.*           ([sqrt(abar_t), sqrt(1 - abar_t)] -> 1024)
    net.2.weight / .bias      head.2.*            (1024 -> 512, after SiLU and dropout 0.3)
    net.5.weight / .bias      head.5.*            (512 -> 1, after SiLU and dropout 0.3)

Checkpoints are read with `torch.load(weights_only=True)`: tensors, plain containers and numbers
only (numpy scalars allowed: the original stores its validation metrics as numpy floats); anything
that needs other code to unpickle is refused. After conversion the engine's classifier and a
direct re-computation of the original's forward pass from its own state dict must give the same
logits on a fixed input, or nothing is written.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy._core.multiarray import scalar as numpy_scalar

from engine.errors import UserError
from engine.guidance.latent_classifier import LatentClassifier
from engine.guidance.latent_classifier_io import save_classifier

ORIGINAL_TO_ENGINE = {
    "t_embed.alphas_cumprod": "alphas_cumprod",
    "fc_x.weight": "latent_in.weight",
    "fc_x.bias": "latent_in.bias",
    "fc_t.weight": "time_in.weight",
    "fc_t.bias": "time_in.bias",
    "net.2.weight": "head.2.weight",
    "net.2.bias": "head.2.bias",
    "net.5.weight": "head.5.weight",
    "net.5.bias": "head.5.bias",
}
ORIGINAL_DROPOUT = 0.3
ORIGINAL_LATENT_CHANNELS = 4  # SD 1.x latents; the original hard-codes (4, 64, 64)
HUB_REPO = re.compile(r"^DiffusionConceptErasure/latent-classifier-(?P<concept>[\w-]+)$")
# The file names the original's loader tries in a hub repo, in its order.
HUB_FILENAMES = ("model.pt", "{concept}.pt", "classifier.pt")
# The original trained on SD 1.4's VAE latents of 512 x 512 photos.
ORIGINAL_MODEL = "CompVis/stable-diffusion-v1-4"

# numpy scalars (the checkpoint's metrics): reconstructed from a dtype and raw bytes, no code runs.
_NUMPY_SCALARS: list[Callable[..., Any] | tuple[Callable[..., Any], str]] = [
    (numpy_scalar, "numpy._core.multiarray.scalar"),
    (numpy_scalar, "numpy.core.multiarray.scalar"),  # pickled by numpy 1.x
    np.dtype,
    *(type(np.dtype(code)) for code in ("float16", "float32", "float64", "int32", "int64", "bool")),
]


def resolve_source(source: str, concept: str | None) -> tuple[Path, str]:
    """(local .pt path, concept slug) for a file path or a hub id `DiffusionConceptErasure/latent-
    classifier-<concept>`; a hub id is read from the local Hugging Face cache (downloaded only when
    HF_HUB_OFFLINE is not set), trying the original's file names in its order."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_file():
            raise UserError(f"{source} is a folder; give the classifier's .pt file")
        return path, concept or path.stem
    match = HUB_REPO.match(source)
    if match is None:
        raise UserError(
            f"{source!r} is neither a .pt file nor a hub id DiffusionConceptErasure/latent-classifier-<concept>"
        )
    concept = concept or match["concept"].replace("-", "_")
    from huggingface_hub import hf_hub_download

    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    for name in HUB_FILENAMES:
        try:
            return Path(hf_hub_download(source, name.format(concept=concept), local_files_only=offline)), concept
        except Exception:  # noqa: BLE001 (not in the cache / not in the repo: try the next name, as the original does)
            continue
    where = "the local Hugging Face cache (HF_HUB_OFFLINE=1)" if offline else "the hub"
    names = ", ".join(n.format(concept=concept) for n in HUB_FILENAMES)
    raise UserError(f"hub classifier {source!r} not found in {where} (looked for {names})")


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(the original's state dict, the checkpoint's other plain entries: epoch, val_loss, metrics)."""
    try:
        with torch.serialization.safe_globals(_NUMPY_SCALARS):
            checkpoint = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 (torch.load raises many types for what is not a weights-only checkpoint)
        raise UserError(f"{path}: refused, not a weights-only torch checkpoint ({_reason(exc)})") from None
    if isinstance(checkpoint, dict) and "model_state_dict" in checkpoint:
        state = checkpoint["model_state_dict"]
        extra = {k: _plain(v) for k, v in checkpoint.items()
                 if k not in ("model_state_dict", "optimizer_state_dict") and _plain(v) is not None}
    else:
        state, extra = checkpoint, {}
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: no state dict of tensors (expected the original's model_state_dict)")
    missing = sorted(set(ORIGINAL_TO_ENGINE) - set(state))
    unexpected = sorted(set(state) - set(ORIGINAL_TO_ENGINE))
    if missing or unexpected:
        raise UserError(
            f"{path}: not the original's latent classifier (missing {missing[:3] or 'none'}, unexpected "
            f"{unexpected[:3] or 'none'})"
        )
    return state, extra


def _reason(exc: Exception) -> str:
    """The line of torch's refusal that names what was refused, else the error's kind."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line or "Unsupported" in line]
    if named:
        return named[0][:160]
    return "not a torch checkpoint" if isinstance(exc, (KeyError, EOFError)) else type(exc).__name__


def _plain(value):
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    return None


def convert(state: dict[str, torch.Tensor]) -> LatentClassifier:
    """The engine's LatentClassifier holding the original's weights."""
    hidden, flat = state["fc_x.weight"].shape
    middle = state["net.2.weight"].shape[0]
    side = math.isqrt(flat // ORIGINAL_LATENT_CHANNELS)
    if side * side * ORIGINAL_LATENT_CHANNELS != flat:
        raise UserError(f"the classifier's input has {flat} values, not {ORIGINAL_LATENT_CHANNELS} x side x side")
    if middle != hidden // 2:
        raise UserError(f"the classifier's head narrows {hidden} -> {middle}; the engine's architecture halves it")
    model = LatentClassifier((ORIGINAL_LATENT_CHANNELS, side, side), state["t_embed.alphas_cumprod"].float(),
                             hidden_size=int(hidden), dropout=ORIGINAL_DROPOUT)
    model.load_state_dict({ORIGINAL_TO_ENGINE[k]: v.float() for k, v in state.items()}, strict=True)
    return model.eval()


def original_logits(state: dict[str, torch.Tensor], latents: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The original's forward pass in eval mode, computed from its own state dict:
    net(fc_x(flatten(z)) + fc_t([sqrt(abar_t), sqrt(1 - abar_t)])), shape (B,)."""
    alpha_bar = state["t_embed.alphas_cumprod"].float()[timesteps]
    encoding = torch.stack([alpha_bar.sqrt(), (1 - alpha_bar).sqrt()], dim=-1)
    hidden = F.linear(latents.flatten(1), state["fc_x.weight"].float(), state["fc_x.bias"].float())
    hidden = hidden + F.linear(encoding, state["fc_t.weight"].float(), state["fc_t.bias"].float())
    hidden = F.linear(F.silu(hidden), state["net.2.weight"].float(), state["net.2.bias"].float())
    return F.linear(F.silu(hidden), state["net.5.weight"].float(), state["net.5.bias"].float()).squeeze(-1)


def fixed_input(model: LatentClassifier, count: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents ~ N(0, 1) from seed 0 and timesteps spread over the schedule, always the same."""
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn((count, *model.latent_shape), generator=generator)
    timesteps = torch.linspace(0, model.num_train_timesteps - 1, count).round().long()
    return latents, timesteps


def import_classifier(source: str, output_dir: str | Path, concept: str | None = None) -> dict[str, Any]:
    """Convert one original classifier into `<output_dir>/<concept>.safetensors + .json`, after
    checking the logits match; returns a summary."""
    from engine.specs.concepts import load_concept
    from engine.specs.runs import ModelSpec

    path, concept = resolve_source(source, concept)
    spec = load_concept(concept)  # UserError for a concept the engine does not know
    state, extra = read_checkpoint(path)
    model = convert(state)
    latents, timesteps = fixed_input(model)
    with torch.no_grad():
        expected = original_logits(state, latents, timesteps)
        got = model(latents, timesteps)
    difference = float((got - expected).abs().max())
    tolerance = 1e-4 * max(1.0, float(expected.abs().max()))
    if not difference <= tolerance:
        raise UserError(f"{path}: converted logits differ from the original's by {difference:.3g}; nothing written")
    info = {
        "label": spec.display_name,
        "display_name": spec.display_name,
        "imported_from": {"source": source, "file": str(path), "checkpoint": extra},
        "data": {
            "model": ModelSpec(name=ORIGINAL_MODEL, pretrained=ORIGINAL_MODEL).model_dump(mode="json"),
            "resolution": 512,
            "images": "the original's training set (ImageNet photos of the class vs other classes)",
        },
        "logit_check": {"max_abs_difference": difference, "inputs": len(timesteps),
                        "timesteps": [int(t) for t in timesteps]},
    }
    weights = save_classifier(output_dir, concept, model, info)
    return {"concept": concept, "path": str(weights), "source": str(path), "max_abs_difference": difference,
            "latent_shape": list(model.latent_shape)}
