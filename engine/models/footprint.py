"""What a model costs before it is loaded (driver side, no torch): bytes in memory per component,
bytes on disk and bytes still to download.

- A local folder or a hub snapshot in this node's cache: its safetensors headers give every
  tensor's shape, so the memory size is exact for the dtype it loads in (fp16 on CUDA, fp32 on CPU).
- A hub model not downloaded: the hub's file listing when online (HfApi.model_info, file sizes);
  offline, or when the listing fails, the default for its architecture below.
- Built-ins: the SD 1.x-shaped one costs what SD 1.x does; the others are the toy world's and the
  tests' small models, at most BUILTIN_SMALL_BYTES.

SD1_PARAMETERS are the parameter counts of Stable Diffusion 1.x's components (diffusers,
CompVis/stable-diffusion-v1-4): UNet 859.52 M, CLIP ViT-L/14 text encoder 123.06 M, VAE 83.65 M.
Its download is the three fp32 safetensors files, about 4.27 GB (4 bytes a parameter) plus small
config and tokenizer files.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from engine.models.builtin import BUILTIN_MODELS
from engine.models.sharing import component_identities
from engine.specs.runs import ModelSpec

logger = logging.getLogger(__name__)

SD1_PARAMETERS = {"unet": 859_520_964, "text_encoder": 123_060_480, "vae": 83_653_863}
SD1_DOWNLOAD_BYTES = 4 * sum(SD1_PARAMETERS.values()) + 2_000_000  # fp32 weights + configs, tokenizer
SD1_BUILTINS = frozenset({"sd14-random"})
BUILTIN_SMALL_BYTES = 16_000_000  # fp32; the toy world's models are 13.7 MB, tiny ones less
WEIGHT_SUFFIXES = (".safetensors",)
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


@dataclass
class ModelFootprint:
    """A model's memory per component (bytes at the dtype it loads in), how to tell its components
    apart from another model's (content identities, when its files are here), its bytes on disk,
    and the bytes still to download (0 when nothing is)."""

    name: str
    memory: dict[str, int]
    identities: dict[str, str] = field(default_factory=dict)
    download_bytes: int = 0
    disk_bytes: int = 0
    source: str = "files"  # files | hub listing | default (SD 1.x) | built-in
    hub_repo: str | None = None

    @property
    def memory_bytes(self) -> int:
        return sum(self.memory.values())


def safetensors_elements(path: Path) -> dict[str, int]:
    """{dtype: elements} of a safetensors file, from its header alone."""
    with path.open("rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(size))
    counts: dict[str, int] = {}
    for name, info in header.items():
        if name != "__metadata__":
            counts[info["dtype"]] = counts.get(info["dtype"], 0) + math.prod(info["shape"])
    return counts


def folder_memory(folder: Path, itemsize: int) -> dict[str, int]:
    """Bytes per component of a pipeline folder loaded at `itemsize` bytes a float."""
    memory = {}
    for component in ("unet", "vae", "text_encoder"):
        files = sorted((folder / component).glob("*.safetensors")) if (folder / component).is_dir() else []
        # One variant only (diffusion_pytorch_model.safetensors before .fp16.safetensors).
        files = [f for f in files if f.name.count(".") == 1] or files[:1]
        memory[component] = sum(_weights_bytes(f, itemsize) for f in files)
    return memory


def _weights_bytes(path: Path, itemsize: int) -> int:
    return sum(n * (itemsize if dtype.startswith(("F", "BF")) else DTYPE_BYTES.get(dtype, 4))
               for dtype, n in safetensors_elements(path).items())


def disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def sd1_memory(itemsize: int) -> dict[str, int]:
    return {name: count * itemsize for name, count in SD1_PARAMETERS.items()}


def model_footprint(spec: ModelSpec, itemsize: int, online: bool | None = None) -> ModelFootprint:
    """The footprint of `spec` at `itemsize` bytes a float (2 = fp16 on a GPU, 4 = fp32 on CPU)."""
    online = (os.environ.get("HF_HUB_OFFLINE", "") not in ("1", "true", "yes", "on")) if online is None else online
    footprint = _base_footprint(spec, itemsize, online)
    if spec.unet is not None:
        footprint.memory["unet"] = _override_bytes(Path(spec.unet), itemsize) or footprint.memory.get("unet", 0)
        footprint.identities.pop("unet", None)
    return footprint


def _base_footprint(spec: ModelSpec, itemsize: int, online: bool) -> ModelFootprint:
    source = spec.pretrained
    if source in BUILTIN_MODELS:
        if source in SD1_BUILTINS:
            return ModelFootprint(spec.name, sd1_memory(itemsize), source="built-in")
        return ModelFootprint(spec.name, {"unet": BUILTIN_SMALL_BYTES * itemsize // 4}, source="built-in")
    folder = Path(source) if Path(source).is_dir() else hub_snapshot(source, spec.revision)
    if folder is not None:
        return ModelFootprint(spec.name, folder_memory(folder, itemsize), component_identities(folder),
                              disk_bytes=disk_bytes(folder), hub_repo=None if Path(source).is_dir() else source)
    listed = hub_listing_bytes(source, spec.revision) if online else None
    if listed is not None:
        return ModelFootprint(spec.name, sd1_memory(itemsize), download_bytes=listed, source="hub listing",
                              hub_repo=source)
    return ModelFootprint(spec.name, sd1_memory(itemsize), download_bytes=SD1_DOWNLOAD_BYTES,
                          source="default (SD 1.x)", hub_repo=source)


def _override_bytes(path: Path, itemsize: int) -> int:
    if path.is_file():
        return _weights_bytes(path, itemsize) if path.suffix == ".safetensors" else path.stat().st_size
    folder = path / "unet" if (path / "unet").is_dir() else path
    return sum(_weights_bytes(f, itemsize) for f in folder.glob("*.safetensors"))


def hub_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The snapshot folder of a hub model in this node's cache, or None."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    index = try_to_load_from_cache(repo_id, "model_index.json", revision=revision)
    return Path(index).parent if isinstance(index, str) else None


def hub_listing_bytes(repo_id: str, revision: str | None) -> int | None:
    """Bytes a diffusers load of `repo_id` downloads (fp32 safetensors of unet, vae, text_encoder,
    plus configs and tokenizer), from the hub's file listing; None when it cannot be listed."""
    try:
        from huggingface_hub import HfApi

        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
    except Exception as error:  # noqa: BLE001 - any failure of the listing falls back to the default
        logger.info("hub listing of %s failed (%s); using the SD 1.x default", repo_id, error)
        return None
    total = 0
    for sibling in info.siblings or []:
        name = sibling.rfilename
        top = name.split("/")[0]
        if "/" not in name and name != "model_index.json":
            continue  # top-level checkpoints (.ckpt, single-file .safetensors) are not what diffusers loads
        if "/" in name and top not in ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "feature_extractor"):
            continue  # safety_checker: the engine loads without it
        if name.endswith((".bin", ".ckpt", ".pt", ".onnx", ".msgpack")) or ".fp16." in name or "non_ema" in name:
            continue
        total += sibling.size or 0
    return total


def hub_cache_dir() -> Path:
    """This node's Hugging Face hub cache (HF_HUB_CACHE, HF_HOME/hub, or the default)."""
    try:
        from huggingface_hub import constants

        return Path(constants.HF_HUB_CACHE)
    except ImportError:
        return Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"
