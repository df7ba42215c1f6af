"""Validated configuration: run specs, model specs, concept specs (pydantic, frozen, no unknown keys).

YAML is read here and nowhere else. Data-like entries are one file each and found by file stem:
configs/models/<id>.yaml, configs/concepts/<id>.yaml. A run file describes a grid; engine.grid
expands it.
"""

from __future__ import annotations

import os
import random
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from engine.errors import UserError, format_validation_error, unknown_choice
from engine.scoring.registry import JudgeRequest, default_judge_refs, parse_judge_ref

DEFAULT_BASE_MODEL = "CompVis/stable-diffusion-v1-4"


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# --------------------------------------------------------------------------- config folders


def config_dirs() -> list[Path]:
    """Folders searched for configs/, first match wins: $ENGINE_CONFIG_DIR entries, ./configs, the repo's."""
    dirs = [Path(p) for p in os.environ.get("ENGINE_CONFIG_DIR", "").split(os.pathsep) if p]
    dirs.append(Path.cwd() / "configs")
    dirs.append(Path(__file__).resolve().parent.parent / "configs")
    unique: list[Path] = []
    for d in dirs:
        if d.is_dir() and d.resolve() not in [u.resolve() for u in unique]:
            unique.append(d)
    return unique


def find_config_files(kind: str) -> dict[str, Path]:
    """All `<kind>/<stem>.yaml` files, keyed by stem (earlier folders shadow later ones)."""
    found: dict[str, Path] = {}
    for d in reversed(config_dirs()):
        for path in sorted((d / kind).glob("*.yaml")):
            found[path.stem] = path
    return found


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: malformed YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of keys at the top level")
    return data


def validate(model: type[BaseModel], data: dict[str, Any], where: str):
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise format_validation_error(exc, where, model) from None


# --------------------------------------------------------------------------- concepts


class PythonRandomSeeds(Frozen):
    """The original's seed list: random.seed(seed), then `count` x randint(low, high)."""

    seed: int = 42
    count: int = Field(500, ge=1)
    low: int = 1
    high: int = 10000

    def values(self) -> list[int]:
        rng = random.Random(self.seed)
        return [rng.randint(self.low, self.high) for _ in range(self.count)]


class ConceptSpec(Frozen):
    name: str = Field(description="Slug, equal to the file stem.")
    kind: Literal["object", "style"] = Field(description="Objects are judged by class; styles by CLIP only.")
    display_name: str = Field(description="Human-readable name, as it appears in prompts.")
    prompt: str = Field(description="Generation prompt, e.g. 'a picture of a church'.")
    clip_text: str = Field(description="Text that CLIP scores images against.")
    judge_classes: dict[str, list[int]] = Field(
        default_factory=dict, description="Per judge name, the exact class indices that count as the concept."
    )
    seeds: list[int] | PythonRandomSeeds = Field(
        default_factory=PythonRandomSeeds, description="Explicit seed list, or the original's generator."
    )
    sample_random_state: int = Field(
        42, description="Prompt i of n is row permutation(random_state)[i]: pandas sample(n, random_state)."
    )

    @field_validator("judge_classes")
    @classmethod
    def _non_empty_classes(cls, value: dict[str, list[int]]) -> dict[str, list[int]]:
        for judge, classes in value.items():
            if not classes:
                raise ValueError(f"judge {judge!r} has an empty class list")
        return value

    def seed_list(self) -> list[int]:
        return list(self.seeds) if isinstance(self.seeds, list) else self.seeds.values()

    def sample_prompts(self, n: int) -> list[tuple[int, str, int]]:
        """(prompt_index, prompt, seed) for n prompts, chosen as the original's
        `df.sample(n, random_state=42)` does (numpy RandomState permutation prefix)."""
        seeds = self.seed_list()
        if n > len(seeds):
            raise UserError(f"concept {self.name!r} has {len(seeds)} prompt/seed rows; asked for {n}")
        order = np.random.RandomState(self.sample_random_state).permutation(len(seeds))[:n]
        return [(int(i), self.prompt, seeds[int(i)]) for i in order]

    def first_prompts(self, n: int) -> list[tuple[int, str, int]]:
        """The first n rows in file order (the original's interference probe uses df.head(n))."""
        seeds = self.seed_list()
        if n > len(seeds):
            raise UserError(f"concept {self.name!r} has {len(seeds)} prompt/seed rows; asked for {n}")
        return [(i, self.prompt, seeds[i]) for i in range(n)]


@lru_cache(maxsize=None)
def _load_concept_file(path: Path) -> ConceptSpec:
    data = read_yaml(path)
    data.setdefault("name", path.stem)
    if data["name"] != path.stem:
        raise UserError(f"{path}: name {data['name']!r} must equal the file stem {path.stem!r}")
    return validate(ConceptSpec, data, str(path))


def available_concepts() -> dict[str, Path]:
    return find_config_files("concepts")


def load_concept(name: str) -> ConceptSpec:
    files = available_concepts()
    if name not in files:
        raise unknown_choice("concept", name, files)
    return _load_concept_file(files[name])


# --------------------------------------------------------------------------- models


class ModelSpec(Frozen):
    name: str = Field(description="Label written in every result row (column `model`).")
    pretrained: str = Field(
        description="Built-in name, Hugging Face hub id, or local diffusers folder. With `unet`, the base."
    )
    unet: str | None = Field(
        None, description="UNet-only override: diffusers UNet folder, pipeline folder or .safetensors file."
    )
    method: str = Field("none", description="Erasure method label (column `method`), e.g. esd-x, uce.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    allow_pickle: bool = Field(False, description="Allow pickle (.bin/.ckpt/.pt) weights. Off by default.")


class ProbeRequest(Frozen):
    name: str = Field(description="Registered probe name, e.g. standard_prompt.")
    params: dict[str, Any] = Field(default_factory=dict, description="Probe parameters (see probes describe).")


class RunSpec(Frozen):
    output: str = Field(description="Output folder: rows/*.parquet and manifest.json.")
    models: list[str | ModelSpec] = Field(
        default_factory=list, description="Models to probe: built-in names, configs/models stems, hub ids, folders."
    )
    base_model: str = Field(
        DEFAULT_BASE_MODEL, description="The original, un-erased model; loaded only when something needs it."
    )
    concepts: list[str] = Field(min_length=1, description="Concept slugs (configs/concepts stems).")
    probes: list[str | ProbeRequest] = Field(min_length=1, description="Probes, by name or with params.")
    num_images: int = Field(ge=1, description="Prompts per (model, concept, probe).")
    batch_size: int = Field(4, ge=1, description="Rows per work unit handed to a probe actor.")
    actors: int | Literal["auto"] = Field("auto", description="Probe actors: auto = one per GPU, else 1.")
    gpus_per_actor: float | Literal["auto"] = Field(
        "auto", description="auto = 1 when the cluster has GPUs, less the scoring stage's share (score_gpus)."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where pipelines run.")
    attention: Literal["sdpa", "xformers"] = Field("sdpa", description="Attention kernel on CUDA.")
    torch_threads: int | None = Field(None, ge=1, description="CPU threads per actor; default: all cores.")
    judges: list[str | JudgeRequest] = Field(
        default_factory=default_judge_refs,
        description="Judges scoring every image: NAME, NAME:PRESET (e.g. clip:tiny, a random test model) or "
        "{name, preset, options}. Default: clip and imagenet with real weights ($ENGINE_JUDGES overrides the "
        "default); [] = no scoring (`engine score` later).",
    )
    score_batch_size: int = Field(16, ge=1, description="Images per batch in the scoring stage.")
    score_actors: int = Field(1, ge=1, description="Scoring actors; one keeps up with many generating GPUs.")
    score_gpus: float | Literal["auto"] = Field(
        "auto", description="GPU fraction per scoring actor: auto = 0.1 when the cluster has GPUs, else 0."
    )

    @field_validator("judges")
    @classmethod
    def _known_judges(cls, value: list) -> list:
        for ref in value:
            parse_judge_ref(ref)  # unknown names fail here, with the valid choices
        return value

    @field_validator("models", "concepts")
    @classmethod
    def _no_duplicates(cls, value: list) -> list:
        return no_duplicate_names(value)


def no_duplicate_names(value: list) -> list:
    """A list of names (or specs with a `name`) in which no name appears twice."""
    keys = [v if isinstance(v, str) else v.name for v in value]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise ValueError(f"listed more than once: {', '.join(duplicates)}")
    return value


def probe_requests(spec: RunSpec) -> list[ProbeRequest]:
    return [ProbeRequest(name=p) if isinstance(p, str) else p for p in spec.probes]


def load_run_file(path: Path, overrides: list[str] = ()) -> RunSpec:
    data = read_yaml(path)
    return run_spec_from_dict(apply_overrides(data, overrides), str(path))


def run_spec_from_dict(data: dict[str, Any], where: str = "run config") -> RunSpec:
    return validate(RunSpec, data, where)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`key.sub=value` overrides; values are parsed as YAML (so 1e-3 is a string, as in files)."""
    data = _deep_copy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set expects key=value, got {item!r}")
        target = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = target.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {key}: {part!r} is not a mapping")
            target = node
        try:
            target[leaf] = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise UserError(f"--set {key}: cannot parse value {raw!r}") from None
    return data


def _deep_copy(value):
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value
