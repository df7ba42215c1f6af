"""Load diffusion pipelines: built-in models, hub ids, local diffusers folders, UNet-only overrides.

Two halves:
- `resolve_model` / `check_model_source` run in the driver: cheap checks that turn a user's model
  reference into a ModelSpec and fail early (missing folder, pickle-only weights, hub id absent
  from an offline cache) before Ray or any model starts.
- `ModelCache` runs in probe actors: base components are loaded once per source and erased UNets
  are swapped in, sharing the VAE, text encoder and tokenizer; engine.acceleration's speed
  settings are applied to every pipeline it hands out.

torch and diffusers are imported by the actor-side functions only, so the driver's checks (and the
CLI's error messages) never wait for them.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

from engine.acceleration import accelerate_pipeline, compile_pipeline_unet
from engine.builtin_models import BUILTIN_MODELS
from engine.concepts import find_config_files, read_yaml, validate
from engine.config import UNKNOWN_METHOD, ModelSpec
from engine.errors import UserError
from engine.model_families import family_members, model_families, model_files

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


# --------------------------------------------------------------------------- driver side


def available_models() -> list[str]:
    """Built-ins, configs/models single-model files, then every family member."""
    return sorted(BUILTIN_MODELS) + sorted(model_files()[0]) + sorted(family_members())


def expand_model_refs(refs: list[str | ModelSpec]) -> list[str | ModelSpec]:
    """A run's `models:` with every family stem replaced by its members' names, in order."""
    families = model_families()
    expanded: list[str | ModelSpec] = []
    for ref in refs:
        is_family = isinstance(ref, str) and ref in families and ref not in BUILTIN_MODELS
        expanded.extend(families[ref].members() if is_family else [ref])
    return expanded


def resolve_model(ref: str | ModelSpec, check_source: bool = True) -> ModelSpec:
    """A user's model reference -> ModelSpec. Order: built-in, configs/models/<ref>.yaml, a family
    member's name, local folder, hub id. Raises UserError for anything else. `check_source=False`
    skips the checks of where the weights are (engine plan reports those instead of failing)."""
    if isinstance(ref, ModelSpec):
        spec = ref
    elif ref in BUILTIN_MODELS:
        builtin = BUILTIN_MODELS[ref]
        spec = ModelSpec(name=ref, pretrained=ref, method=builtin.method, erased=list(builtin.erased))
    elif ref in model_files()[0]:
        path = model_files()[0][ref]
        data = read_yaml(path)
        data.setdefault("name", ref)
        spec = validate(ModelSpec, data, str(path))
    elif ref in family_members():
        spec = family_members()[ref]
    elif ref in model_families():
        raise UserError(f"{ref!r} is a model family ({len(model_families()[ref].members())} models): list it "
                        "in a run's `models:`, or name one member (engine models lists them)")
    elif _looks_like_path(ref):
        spec = ModelSpec(name=Path(ref).name, pretrained=str(Path(ref).expanduser().resolve()))
    elif HUB_ID.match(ref):
        spec = ModelSpec(name=ref, pretrained=ref)
    else:
        raise UserError(
            f"unknown model {ref!r}; use a built-in ({', '.join(sorted(BUILTIN_MODELS))}), a configs/models "
            f"entry ({', '.join(sorted(find_config_files('models'))) or 'none'}), a family member, a local folder "
            "or a hub id org/name"
        )
    if check_source:
        check_model_source(spec)
    return spec


def unet_override_spec(unet_path: str, base_model: str, method: str | None = None,
                       erased: list[str] = ()) -> ModelSpec:
    """`--unet PATH`: the erased UNet on the base model's other components. Without a method it is
    labelled `unknown` explicitly (so its rows hash as they always did)."""
    path = Path(unet_path).expanduser()
    if not path.exists():
        raise UserError(f"UNet path not found: {unet_path}")
    base = resolve_model(base_model)
    spec = ModelSpec(name=path.stem if path.is_file() else path.name, pretrained=base.pretrained,
                     unet=str(path.resolve()), method=method or UNKNOWN_METHOD, erased=list(erased),
                     revision=base.revision)
    check_model_source(spec)
    return spec


def _looks_like_path(ref: str) -> bool:
    return ref.startswith((".", "/", "~")) or os.path.exists(ref)


def check_model_source(spec: ModelSpec) -> None:
    """Cheap checks of where the weights come from; never loads weights."""
    source = spec.pretrained
    if source not in BUILTIN_MODELS:
        if _looks_like_path(source):
            _check_local_pipeline_folder(Path(source).expanduser(), spec)
        elif not HUB_ID.match(source):
            raise UserError(f"model {spec.name!r}: {source!r} is neither a built-in, a folder nor a hub id")
        elif os.environ.get("HF_HUB_OFFLINE") == "1":
            _check_offline_cache(source, spec.revision)
    if spec.unet is not None:
        _check_unet_source(Path(spec.unet).expanduser(), spec)


def _check_local_pipeline_folder(path: Path, spec: ModelSpec) -> None:
    if not path.is_dir():
        raise UserError(f"model folder not found: {path}")
    if not (path / "model_index.json").exists():
        raise UserError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
    _check_weight_format(path / "unet", spec)


def _check_unet_source(path: Path, spec: ModelSpec) -> None:
    if not path.exists():
        raise UserError(f"UNet path not found: {path}")
    if path.is_file():
        if path.suffix == ".safetensors":
            return
        if path.suffix in PICKLE_SUFFIXES and spec.allow_pickle:
            return
        raise UserError(
            f"{path}: only .safetensors UNet files load by default; pass --allow-pickle to load {path.suffix}"
        )
    folder = path / "unet" if (path / "unet" / "config.json").exists() else path
    if not (folder / "config.json").exists():
        raise UserError(f"{path} is not a diffusers UNet folder (no config.json, no unet/config.json)")
    _check_weight_format(folder, spec)


def _check_weight_format(folder: Path, spec: ModelSpec) -> None:
    if not folder.is_dir():
        return
    files = [p.name for p in folder.iterdir()]
    if any(f.endswith(".safetensors") for f in files):
        return
    if any(f.endswith(PICKLE_SUFFIXES) for f in files):
        if spec.allow_pickle:
            return
        raise UserError(
            f"{folder} has only pickle weights (unsafe to load); convert to safetensors or pass --allow-pickle"
        )
    raise UserError(f"{folder} holds no weights (.safetensors)")


def _check_offline_cache(repo_id: str, revision: str | None) -> None:
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(repo_id, revision=revision, local_files_only=True)
    except Exception:
        raise UserError(
            f"hub model {repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1; "
            "download it first or unset HF_HUB_OFFLINE"
        ) from None


# --------------------------------------------------------------------------- actor side


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


def load_base_pipeline(source: str, revision: str | None, allow_pickle: bool, dtype: torch.dtype):
    """The full pipeline from a built-in name, a local folder or a hub id."""
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
    )
    return pipe


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


class ModelCache:
    """Pipelines for the models an actor serves. Base components are loaded once per source; a
    UNet override shares everything else with its base. Least recently used UNets are dropped
    beyond `max_unets` so a long grid does not fill GPU memory. Thread-safe: an actor may load its
    first model in the background while Ray hands it the first unit."""

    def __init__(self, device: torch.device, attention: str = "sdpa", max_unets: int = 3, compile: bool = False):
        self.device = device
        self.dtype = dtype_for(device)
        self.attention = attention
        self.max_unets = max_unets
        self.compile = compile
        self._bases: dict[tuple, object] = {}
        self._pipelines: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.RLock()

    def pipeline(self, spec: ModelSpec):
        with self._lock:
            return self._pipeline(spec)

    def _pipeline(self, spec: ModelSpec):
        key = spec.model_dump_json()
        if key in self._pipelines:
            self._pipelines.move_to_end(key)
            return self._pipelines[key]
        base = self._base(spec)
        if spec.unet is None:
            pipe = base
        else:
            unet = load_unet(spec.unet, base.unet, spec.allow_pickle, self.dtype).to(self.device)
            pipe = type(base)(**{**base.components, "unet": unet})
            set_attention(pipe, self.attention, self.device)
            accelerate_pipeline(pipe, self.device)
            if self.compile:
                compile_pipeline_unet(pipe)
        pipe.set_progress_bar_config(disable=True)
        self._pipelines[key] = pipe
        while len(self._pipelines) > self.max_unets:
            self._pipelines.popitem(last=False)
        return pipe

    def _base(self, spec: ModelSpec):
        key = (spec.pretrained, spec.revision)
        if key not in self._bases:
            logger.info("loading %s on %s (%s)", spec.pretrained, self.device, self.dtype)
            pipe = load_base_pipeline(spec.pretrained, spec.revision, spec.allow_pickle, self.dtype)
            pipe = pipe.to(self.device)
            pipe.set_progress_bar_config(disable=True)
            set_attention(pipe, self.attention, self.device)
            accelerate_pipeline(pipe, self.device, compile_unet=self.compile)
            self._bases[key] = pipe
        return self._bases[key]
