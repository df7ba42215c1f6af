"""Load pipelines and UNets on an actor: device and dtype, safetensors-only weights unless pickle is
allowed, attention processors. torch and diffusers are imported inside the functions."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from engine.errors import UserError
from engine.models.builtin import BUILTIN_MODELS
from engine.models.resolve import HUB_ID

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


def resolve_device(device: str = "auto") -> torch.device:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda requested but no CUDA device is available")
    return torch.device(device)


def dtype_for(device: torch.device) -> torch.dtype:
    # fp16 on CUDA (as the original and every published SD benchmark); fp32 on CPU, where fp16
    # kernels are slow or missing.
    import torch

    return torch.float16 if device.type == "cuda" else torch.float32


def load_base_pipeline(source: str, revision: str | None, allow_pickle: bool, dtype: torch.dtype,
                       reuse: dict[str, object] | None = None):
    """The full pipeline from a built-in name, a local folder or a hub id. Components in `reuse`
    (name -> a module already loaded with the same weights) are taken as they are, not loaded.
    A built-in is built whole (it has no files to skip); the cache swaps in the held components."""
    import torch
    from diffusers import StableDiffusionPipeline

    if source in BUILTIN_MODELS:
        pipe = BUILTIN_MODELS[source].build()
        # Built-ins are made in fp32; cast only when needed (a no-op cast still warns).
        return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)
    pipe = StableDiffusionPipeline.from_pretrained(
        source,
        revision=revision,
        torch_dtype=dtype,
        use_safetensors=None if allow_pickle else True,
        safety_checker=None,
        requires_safety_checker=False,
        **(reuse or {}),
    )
    return pipe


def pipeline_folder(source: str, revision: str | None) -> Path | None:
    """The folder a pipeline loads from: a local folder, or the hub snapshot in this node's cache
    (None for a built-in, or a hub model not downloaded yet)."""
    if source in BUILTIN_MODELS:
        return None
    if Path(source).is_dir():
        return Path(source)
    if not HUB_ID.match(source):  # a local folder that is gone: the load itself says so, as a missing model
        return None
    from huggingface_hub import try_to_load_from_cache

    index = try_to_load_from_cache(source, "model_index.json", revision=revision)
    return Path(index).parent if isinstance(index, str) else None


def load_unet(path: str, like, allow_pickle: bool, dtype: torch.dtype):
    """An erased UNet: a diffusers UNet folder, a pipeline folder (its unet/), or a state-dict file
    for the base UNet's architecture."""
    import torch
    from diffusers import UNet2DConditionModel

    location = Path(path)
    if location.is_file():
        if location.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(location))
        else:
            state = torch.load(str(location), map_location="cpu", weights_only=not allow_pickle)
        unet = UNet2DConditionModel.from_config(like.config)
        missing, unexpected = unet.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{path}: state dict does not match the base UNet ({len(missing)} missing, "
                f"{len(unexpected)} unexpected keys, e.g. {(missing + unexpected)[:3]})"
            )
        return unet.to(dtype=dtype)
    subfolder = "unet" if (location / "unet" / "config.json").exists() else None
    return UNet2DConditionModel.from_pretrained(
        str(location), subfolder=subfolder, torch_dtype=dtype, use_safetensors=None if allow_pickle else True
    )


def set_attention(pipe, attention: str, device: torch.device) -> None:
    if attention == "sdpa":
        return  # diffusers' default processor (AttnProcessor2_0) is torch SDPA
    if attention == "xformers":
        from diffusers.utils import is_xformers_available

        if device.type != "cuda" or not is_xformers_available():
            raise UserError("attention 'xformers' needs a CUDA device and `pip install .[gpu]`; use sdpa")
        pipe.enable_xformers_memory_efficient_attention()
        return
    raise UserError(f"unknown attention {attention!r}; valid choices: sdpa, xformers")


