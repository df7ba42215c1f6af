"""Turn a user's model reference into a ModelSpec, in the driver: cheap checks that fail early (missing
folder, pickle-only weights, hub id absent from an offline cache) before Ray or any model starts.
Never imports torch or diffusers."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

from engine.errors import UserError, did_you_mean
from engine.models.builtin import BUILTIN_MODELS
from engine.models.families import family_members, model_families, model_files
from engine.specs.base import validate
from engine.specs.files import find_config_files
from engine.specs.runs import UNKNOWN_METHOD, ModelSpec
from engine.specs.yaml_reader import read_yaml

logger = logging.getLogger(__name__)

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


def available_models() -> list[str]:
    """Built-ins, configs/models single-model files, then every family member."""
    return sorted(BUILTIN_MODELS) + sorted(model_files()[0]) + sorted(family_members())


def expand_model_refs(refs: list[str | ModelSpec]) -> list[str | ModelSpec]:
    """A run's `models:` with every family stem replaced by its members' names, in order."""
    families = model_families()
    expanded: list[str | ModelSpec] = []
    for ref in refs:
        if isinstance(ref, str) and ref in families and ref not in BUILTIN_MODELS:
            expanded.extend(families[ref].members())
        else:
            expanded.append(ref)
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
            f"unknown model {ref!r}{did_you_mean(ref, available_models())}; "
            f"use a built-in ({', '.join(sorted(BUILTIN_MODELS))}), a configs/models "
            f"entry ({', '.join(sorted(find_config_files('models'))) or 'none'}), a family member, a local folder "
            "or a hub id org/name"
        )
    if check_source:
        check_model_source(spec)
    return spec


def unet_override_spec(unet_path: str, base_model: str, method: str | None = None,
                       erased: Sequence[str] = ()) -> ModelSpec:
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
    except Exception:  # noqa: BLE001 (any hub error here means: not in the local cache)
        raise UserError(
            f"hub model {repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1; "
            "download it first or unset HF_HUB_OFFLINE"
        ) from None


# --------------------------------------------------------------------------- actor side


