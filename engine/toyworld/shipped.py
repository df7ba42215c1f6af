"""The shipped toy-world models, loaded from the safetensors committed in engine/toyworld/weights.

`toy-base` is a full diffusers pipeline folder. Erased variants ship only what their method
changes (the cross-attention key/value projections), applied on top of a fresh copy of the base.
"""

from __future__ import annotations

from pathlib import Path

from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
ERASED_METHODS = {"esdx": "esd-x", "uce": "uce"}


def cross_attention_kv_names(unet) -> list[str]:
    """Names of the parameters ESD-x trains: the cross-attention key/value projection weights."""
    return [name for name, _ in unet.named_parameters() if ".attn2.to_k." in name or ".attn2.to_v." in name]


def _missing(path: Path) -> FileNotFoundError:
    return FileNotFoundError(f"toy-world weights not found at {path}; run `engine toyworld build` to make them")


def load_toy_base(weights_dir: Path = WEIGHTS_DIR) -> StableDiffusionPipeline:
    folder = weights_dir / "toy-base"
    if not (folder / "model_index.json").exists():
        raise _missing(folder)
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False,
                                                   use_safetensors=True, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_toy_erased(method: str, concept: str, weights_dir: Path = WEIGHTS_DIR) -> StableDiffusionPipeline:
    """`method` is a file prefix: esdx or uce."""
    path = weights_dir / f"{method}-{concept}.safetensors"
    if not path.exists():
        raise _missing(path)
    pipe = load_toy_base(weights_dir)
    state = load_file(str(path))
    allowed = set(cross_attention_kv_names(pipe.unet))
    if not set(state) <= allowed:
        raise ValueError(f"{path} holds tensors other than attn2 k/v: {sorted(set(state) - allowed)[:3]}")
    pipe.unet.load_state_dict(state, strict=False)
    return pipe


def toy_model_names(concepts: tuple[str, ...] = ("circle", "triangle")) -> dict[str, tuple[str, str | None]]:
    """Built-in name -> (method label, erased concept) for the toy models the build ships."""
    names: dict[str, tuple[str, str | None]] = {"toy-base": ("none", None)}
    for concept in concepts:
        for prefix, label in ERASED_METHODS.items():
            names[f"toy-{prefix}-{concept}"] = (label, concept)
    return names
