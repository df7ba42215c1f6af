"""Validated run and model specs (pydantic, frozen, no unknown keys); concepts live in engine.specs.concepts.

Model entries are one file each, found by file stem: configs/models/<id>.yaml. A run file
describes a grid; engine.pipeline.grid expands it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from engine.errors import UserError
from engine.specs.base import Frozen, validate
from engine.specs.judges import JudgeRequest, default_judge_refs, parse_judge_ref
from engine.specs.sources import Sources
from engine.specs.yaml_reader import read_yaml_with_sources

Tracker = Literal["mlflow", "wandb"]  # the experiment trackers (engine.tracking.trackers describes each)

DEFAULT_BASE_MODEL = "CompVis/stable-diffusion-v1-4"
BASE_METHOD = "none"  # the `method` label of the un-erased base model
UNKNOWN_METHOD = "unknown"  # the label of a model that does not say how it was erased


# --------------------------------------------------------------------------- models


class ModelSpec(Frozen):
    name: str = Field(description="Label written in every result row (column `model`).")
    pretrained: str = Field(
        description="Built-in name, Hugging Face hub id, or local diffusers folder. With `unet`, the base."
    )
    unet: str | None = Field(
        None, description="UNet-only override: diffusers UNet folder, pipeline folder or .safetensors file."
    )
    method: str | None = Field(
        None,
        description="Erasure method label (column `method`), e.g. esdx, uce; `none` marks the un-erased base "
        "model. Unset: `unknown` in result rows (the run's base model: `none`).",
    )
    erased: list[str] = Field(
        default_factory=list,
        description="Concept slugs this model erased. Recovery probes run on these; interference on the "
        "other concepts of their set. Empty: the model declares nothing and runs the run's full grid.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    allow_pickle: bool = Field(False, description="Allow pickle (.bin/.ckpt/.pt) weights. Off by default.")

    @field_validator("erased")
    @classmethod
    def _erased_once(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"concepts listed more than once: {value}")
        return value

    @model_validator(mode="after")
    def _base_erased_nothing(self):
        if self.method == BASE_METHOD and self.erased:
            raise ValueError(f"method '{BASE_METHOD}' marks the un-erased base model; it cannot erase {self.erased}")
        return self

    @property
    def method_label(self) -> str:
        """The `method` column: the declared label, or `unknown` (never the base model's `none`)."""
        return self.method if self.method is not None else UNKNOWN_METHOD

    def identity(self) -> dict[str, Any]:
        """This model's part of a row's identity (row_id). What it erased decides which rows exist,
        not what an image looks like, so `erased` is left out; an unset label hashes as `none`, the
        label's default before models were labelled `unknown`, so runs made then still resume."""
        data = self.model_dump(mode="json", exclude={"erased"})
        if data["method"] is None:
            data["method"] = BASE_METHOD
        return data


class ProbeRequest(Frozen):
    name: str = Field(description="Registered probe name, e.g. standard_prompt.")
    params: dict[str, Any] = Field(default_factory=dict, description="Probe parameters (see probes describe).")


class RunSpec(Frozen):
    output: str = Field(
        description="Output folder: rows/*.parquet and manifest.json. A local path or a URI (s3://, gs://, abfs://, "
        "file://, local://)."
    )
    shared_output: bool = Field(
        False, description="A local output path every node of the cluster sees (NFS...): nodes write to it directly. "
        "Network mounts are recognised without it."
    )
    models: list[str | ModelSpec] = Field(
        default_factory=list, description="Models to probe: built-in names, configs/models stems, hub ids, folders."
    )
    base_model: str = Field(
        DEFAULT_BASE_MODEL, description="The original, un-erased model; loaded only when something needs it."
    )
    concepts: list[str] = Field(min_length=1, description="Concept slugs (configs/concepts stems).")
    probes: list[str | ProbeRequest] = Field(min_length=1, description="Probes, by name or with params.")
    num_images: int = Field(ge=1, description="Prompts per (model, concept, probe).")
    prompt_indices: list[int] | None = Field(
        None,
        description="Evaluate exactly these rows of each concept's prompt/seed list (their prompt_index, 0-based) "
        "instead of the first num_images of its sampling order; as many as num_images. `engine tune` writes the "
        "held-out prompts of its re-run here, so its best config reproduces the held-out estimate.",
    )
    base_probes: list[str] | None = Field(
        None,
        description="In a run with erased models: the probes the base model runs as the reference (it must be "
        "listed in `models:`). Default: standard_prompt, noise_based, inpainting and interference, when run.",
    )
    batch_size: int | Literal["auto"] = Field(
        "auto",
        description="Rows generated together. auto: 4 on CPU; on a GPU the largest batch its free memory holds, "
        "measured once per actor and model (recorded in the manifest). An integer fixes the units, and so the bits.",
    )
    model_memory: float | Literal["auto"] = Field(
        "auto",
        description="Bytes of models a probe actor holds, in GB: pipelines are evicted least recently used first to "
        "stay under it. auto: 60% of the device's memory (a GPU's, or RAM on CPU); the rest is the probe's "
        "working set.",
    )
    space_check: bool = Field(
        True, description="Check the room before work: the rows' estimated size against the free space of a local "
        "output, and the models to download against the hub cache's disk. false: --no-space-check."
    )
    keep_downloads: bool = Field(
        True, description="false: delete a hub snapshot this run downloaded once that model's units are done."
    )
    compile: bool = Field(False, description="torch.compile the UNet (faster after a compile of minutes per shape).")
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
    tracking: list[Tracker] = Field(
        default_factory=list, description="Experiment trackers the finished run is logged to (--track): mlflow and "
        "wandb log the resolved config, counts, the recovery table's values and the report folder (mlflow: "
        "MLFLOW_TRACKING_URI, default MLflow's local store; wandb: offline into ./wandb unless WANDB_MODE=online).",
    )
    score_actors: int = Field(1, ge=1, description="Scoring actors; one keeps up with many generating GPUs.")
    score_gpus: float | Literal["auto"] = Field(
        "auto", description="GPU fraction per scoring actor: auto = 0.1 when the cluster has GPUs, else 0."
    )

    @field_validator("batch_size", mode="before")
    @classmethod
    def _auto_or_positive(cls, value: Any) -> Any:
        """One error naming both choices, instead of one per branch of the union."""
        if value == "auto":
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            raise PydanticCustomError("int_or_auto", "Input should be a positive integer or 'auto'")
        if value < 1:
            raise PydanticCustomError("greater_than_equal", "Input should be greater than or equal to {ge}", {"ge": 1})
        return value

    @field_validator("model_memory", mode="before")
    @classmethod
    def _auto_or_gigabytes(cls, value: Any) -> Any:
        if value == "auto":
            return value
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0 or value == float("inf"):
            raise PydanticCustomError("gb_or_auto", "Input should be a positive number of GB or 'auto'")
        return value

    @field_validator("prompt_indices")
    @classmethod
    def _distinct_indices(cls, value: list[int] | None) -> list[int] | None:
        if value is None:
            return value
        if not value:
            raise ValueError("give at least one prompt index, or leave prompt_indices out")
        if any(i < 0 for i in value):
            negative = sorted(i for i in value if i < 0)
            raise ValueError(f"prompt indices are 0-based rows of a concept's list; got {negative}")
        if len(set(value)) != len(value):
            raise ValueError(f"prompt indices listed more than once: {value}")
        return value

    @model_validator(mode="after")
    def _indices_match_num_images(self):
        if self.prompt_indices is not None and len(self.prompt_indices) != self.num_images:
            raise ValueError(f"prompt_indices lists {len(self.prompt_indices)} prompts but num_images is "
                             f"{self.num_images}; they must agree")
        return self

    @field_validator("judges")
    @classmethod
    def _known_judges(cls, value: list) -> list:
        for ref in value:
            parse_judge_ref(ref)  # unknown names fail here, with the valid choices
        return value

    @field_validator("models", "concepts", "tracking")
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


def load_run_file(path: Path, overrides: Sequence[str] = ()) -> RunSpec:
    data, sources = read_yaml_with_sources(path)
    return run_spec_from_dict(apply_overrides(data, overrides, sources), sources)


def run_spec_from_dict(data: dict[str, Any], where: str | Sources = "run config") -> RunSpec:
    return validate(RunSpec, data, where)


def apply_overrides(data: dict[str, Any], overrides: Sequence[str], sources: Sources | None = None) -> dict[str, Any]:
    """`key.sub=value` overrides; values are parsed as YAML (so 1e-3 is a string, as in files).
    Each key set is recorded in `sources` as `--set key=value`, so an error blames the flag."""
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
        except RecursionError:
            raise UserError(f"--set {key}: value nested too deeply") from None
        if sources is not None:
            sources.record(tuple(key.split(".")), f"--set {item}")
    return data


def _deep_copy(value):
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value
