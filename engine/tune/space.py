"""Tune configs and search spaces: parsed, and checked against the probe's params class, before any trial.

A tune config (`engine tune CONFIG.yaml`; the shipped ones are configs/tune/<probe>.yaml) names one
probe, the params every trial shares, and a search space:

    probe: noise_based
    params: {num_inference_steps: 50}          # fixed for every trial
    space:
      eta: {low: 0.0, high: 3.0, grid: [1.0, 1.17, 1.34, 1.51, 1.68, 1.85]}
      variance_scale: {low: 0.9, high: 1.2, grid: [1.0, 1.02, 1.03, 1.04]}

A space key is a field of the probe's params class. A sweep field (a list, e.g. `eta_values` of a
best-of-N probe) is searched by its own name or its singular (`eta`, `variance_scale`,
`handover_step`, `classifier_scale`): a trial sets a one-value sweep, so it measures that one
setting instead of keeping the best image of a sweep. Distributions: uniform, loguniform, int,
logint (inclusive bounds) and choice (`values:`); the default follows the field's type. `grid:`
lists the points of the grid algorithm (the original's sweep); without it, a grid takes
`grid_points` evenly (log-evenly) spaced values.

Every check here runs in the driver and raises a one-line UserError: unknown key, bad distribution,
low > high, a log range reaching 0, a type that the field rejects, and every corner of the space
(each dimension at its low or high) validated by the params class itself.
"""

from __future__ import annotations

import itertools
import json
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from engine.errors import UserError, unknown_choice
from engine.metrics.columns import METRICS
from engine.probe import ProbeParams, get_probe_class, parse_params
from engine.specs.base import Frozen, validate
from engine.specs.files import SHIPPED, find_config_entries, find_config_files
from engine.specs.runs import DEFAULT_BASE_MODEL, ModelSpec, Tracker, apply_overrides, no_duplicate_names
from engine.specs.sources import Sources
from engine.specs.yaml_reader import read_yaml_with_sources

RANGE_DISTRIBUTIONS = ("int", "logint", "loguniform", "uniform")
DISTRIBUTIONS = ("choice", *RANGE_DISTRIBUTIONS)
# Objective column -> (how rows reduce to the metric, the judge slot that fills the column).
OBJECTIVES: dict[str, tuple[str, str]] = {m.column: (m.kind, m.slot) for m in METRICS}
MAX_GRID_POINTS = 10_000


class _Dimension(Frozen):
    grid: list[Any] | None = Field(None, description="Points of the grid algorithm (default: grid_points spaced).")

    @field_validator("grid")
    @classmethod
    def _grid_points(cls, value: list[Any] | None) -> list[Any] | None:
        if value is not None and not value:
            raise ValueError("a `grid:` list must not be empty")
        _finite_items(value)
        return value


class ChoiceDimension(_Dimension):
    """One of the listed values (any type: numbers, strings, lists)."""

    distribution: Literal["choice"] = Field("choice", description="choice: one of `values`.")
    values: list[Any] = Field(min_length=1, description="The options.")

    @field_validator("values")
    @classmethod
    def _finite_values(cls, value: list[Any]) -> list[Any]:
        _finite_items(value)
        return value


class RangeDimension(_Dimension):
    """A number from low to high. Whether the searched field is an integer is checked against the
    probe's params class (parse_space), which this model does not know."""

    distribution: str | None = Field(
        None, description="uniform, loguniform, int or logint; default: int for integer fields, else uniform."
    )
    low: float = Field(description="Lower bound (inclusive).")
    high: float = Field(description="Upper bound (inclusive).")

    @field_validator("distribution")
    @classmethod
    def _known(cls, value: str | None) -> str | None:
        if value is not None and value not in RANGE_DISTRIBUTIONS:
            raise ValueError(str(unknown_choice("distribution", value, DISTRIBUTIONS)))
        return value

    @model_validator(mode="after")
    def _range(self) -> RangeDimension:
        low, high = self.low, self.high
        if low > high:
            raise ValueError(f"low {_fmt(low)} > high {_fmt(high)}")
        if low == high:
            raise ValueError(f"low equals high ({_fmt(low)}); fix the value in params instead")
        if not math.isfinite(high - low):
            raise ValueError(f"the range {_fmt(low)} to {_fmt(high)} is too wide to step through")
        if self.distribution in ("loguniform", "logint") and low <= 0:
            raise ValueError(f"a {self.distribution} range needs low > 0 (got {_fmt(low)}); log(0) is undefined")
        if self.distribution in ("int", "logint"):
            _whole_bounds(self.distribution, low, high)
        return self

    def resolved(self, field: str, kind: str) -> str:
        """The distribution for a field of `kind` ('int', 'float' or 'other'). Raises ValueError."""
        if kind == "other":
            raise ValueError(f"{field!r} is not a number; search it with distribution choice and values")
        distribution = self.distribution or ("int" if kind == "int" else "uniform")
        if kind == "int" and distribution in ("uniform", "loguniform"):
            raise ValueError(f"{field!r} is an integer; use distribution int or logint")
        if distribution in ("int", "logint"):
            _whole_bounds(distribution, self.low, self.high)
        return distribution


def _dimension_kind(data: Any) -> str:
    """Which model reads a dimension: a choice when it says so or lists `values`, else a range. The
    tags are in angle brackets so error messages leave them out of the key's path (engine.errors)."""
    if isinstance(data, dict):
        distribution = data.get("distribution")
        return "<choice>" if distribution == "choice" or (distribution is None and "values" in data) else "<range>"
    return "<choice>" if isinstance(data, ChoiceDimension) else "<range>"


# A searched key: a discriminated union, each kind validating its own fields.
Dimension = Annotated[
    Annotated[ChoiceDimension, Tag("<choice>")] | Annotated[RangeDimension, Tag("<range>")],
    Discriminator(_dimension_kind),
]


def _finite_items(value: list[Any] | None) -> None:
    # Items of any type (a choice may list strings), so Frozen's finite-float rule does not reach them.
    for item in value or ():
        if isinstance(item, float) and not math.isfinite(item):
            raise ValueError(f"{item} is not a finite number")


def _whole_bounds(distribution: str, low: float, high: float) -> None:
    if not (float(low).is_integer() and float(high).is_integer()):
        raise ValueError(f"{distribution} bounds must be whole numbers (got {_fmt(low)}, {_fmt(high)})")


class SchedulerSpec(Frozen):
    name: Literal["asha"] = Field(description="asha: successive halving on images scored (ray.tune ASHAScheduler).")
    grace_period: int = Field(ge=1, description="Images a trial scores before it can be stopped.")
    reduction_factor: float = Field(3.0, gt=1, description="1/reduction_factor of the trials go on at each rung.")


class TuneSpec(Frozen):
    output: str = Field(
        description="Output folder: trials.parquet, best_<model>_<concept>.yaml, Tune state. A path or a URI (s3://...)."
    )
    shared_output: bool = Field(
        False, description="A local output every cluster node sees (NFS...): actors cache in OUTPUT/cache."
    )
    models: list[str | ModelSpec] = Field(default_factory=list, description="Models; one search per (model, concept).")
    concepts: list[str] = Field(
        default_factory=list,
        description="Concept slugs; one search per (model, concept). A model that erased concepts is searched on "
        "those (the listed ones among them; all of them when none is listed).",
    )
    probe: str = Field(description="The probe whose params are searched.")
    params: dict[str, Any] = Field(default_factory=dict, description="Probe params shared by every trial.")
    space: dict[str, Dimension] = Field(min_length=1, description="Searched params: key -> dimension.")
    objective: str = Field(
        "judge_top1", description="Maximised metric: " + ", ".join(OBJECTIVES) + " (rates by their share of hits, "
        "the others by their mean)."
    )
    algorithm: Literal["tpe", "random", "grid"] = Field(
        "tpe", description="tpe (Optuna TPE), random, or grid (every grid point; num_samples unused)."
    )
    num_samples: int = Field(16, ge=1, description="Trials per (model, concept) for tpe and random.")
    grid_points: int = Field(
        5, ge=2, le=MAX_GRID_POINTS, description="Grid values of a dimension without an explicit `grid:`."
    )
    startup_trials: int | None = Field(
        None, ge=1, description="TPE: random trials before the model guides; default max(2, min(10, num_samples // 4))."
    )
    seed: int = Field(0, description="Seed of the search algorithm (prompts and seeds are the concept's).")
    num_images: int = Field(ge=1, description="Prompts per trial: the concept's first num_images sampled prompts.")
    held_out: bool = Field(
        True,
        description="Re-run the best setting on a held-out set: the next num_images prompts, with seeds the search "
        "did not use. A search's best rate is biased upward (it is a maximum); the held-out rate is not.",
    )
    batch_size: int = Field(4, ge=1, description="Rows generated together; a trial reports after each batch.")
    scheduler: SchedulerSpec | None = Field(
        None, description="Early stopping (asha); null = every trial runs to the end."
    )
    base_model: str = Field(DEFAULT_BASE_MODEL, description="The original model, for probes that need it.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when trials get GPUs.")
    attention: Literal["sdpa", "xformers"] = Field("sdpa", description="Attention kernel on CUDA.")
    torch_threads: int | None = Field(None, ge=1, description="CPU threads per trial; default: cpus_per_trial.")

    @field_validator("objective")
    @classmethod
    def _known_objective(cls, value: str) -> str:
        if value not in OBJECTIVES:
            raise ValueError(str(unknown_choice("objective", value, OBJECTIVES)))
        return value
    judges: list[str | dict[str, Any]] | None = Field(
        None, description="Judges scoring each trial's images (as in run configs); default: the run default."
    )
    score_batch_size: int = Field(16, ge=1, description="Images per judge batch.")
    cpus_per_trial: float = Field(1.0, gt=0, description="CPUs each trial reserves.")
    gpus_per_trial: float | Literal["auto"] = Field("auto", description="auto = 1 when the cluster has GPUs, else 0.")
    reuse_actors: bool = Field(
        True, description="Keep a finished trial's actor, and the pipelines it loaded, for the next trial; "
        "false = a fresh process and load per trial (only to measure what reuse saves)."
    )
    max_concurrent_trials: int | Literal["auto"] = Field(
        "auto", description="Trials at once per search; auto = what the resources allow (TPE: at most 4)."
    )
    tracking: list[Tracker] = Field(
        default_factory=list, description="Experiment trackers (--track), one tracker run per trial with its params "
        "and results (Ray Tune's callbacks): mlflow to MLFLOW_TRACKING_URI (default MLflow's local store), wandb "
        "offline into ./wandb unless WANDB_MODE=online.",
    )

    @field_validator("models", "concepts")
    @classmethod
    def _no_duplicates(cls, value: list) -> list:
        return no_duplicate_names(value)


# --------------------------------------------------------------------------- reading configs


def available_tune_configs() -> dict[str, Path]:
    return find_config_files("tune")


def tune_spec_from_dict(data: dict[str, Any], where: str | Sources) -> TuneSpec:
    return validate(TuneSpec, data, where)


# The flag of each key `engine tune` can set from its command line, to name it in errors.
FLAG_NAMES = {"models": "--model", "concepts": "--concept", "tracking": "--track"}


def load_tune_spec(
    config: Path | None, flags: dict[str, Any], overrides: typing.Sequence[str] = ()
) -> tuple[TuneSpec, Sources]:
    """CONFIG.yaml (or, with only --probe, the shipped configs/tune/<probe>.yaml), then the CLI
    flags that were given (models, concepts, probe, num_samples...), then --set overrides.

    Returns the spec and where each of its keys came from (a Sources, whose str() is the config
    file), so a bad flag is blamed on the flag, not on a shipped file the user never opened."""
    probe = flags.get("probe")
    if config is None and probe is None:
        raise UserError("give a tune config file or --probe (its search space is configs/tune/<probe>.yaml)")
    label = None
    if config is None:
        files = available_tune_configs()
        if probe not in files:
            raise UserError(
                f"no search space for probe {probe!r} in configs/tune/ (have: {', '.join(sorted(files)) or 'none'}); "
                f"write configs/tune/{probe}.yaml or pass a tune config file"
            )
        config = files[probe]
        source = find_config_entries("tune")[probe].source
        label = f"shipped config {config}" if source == SHIPPED else None  # else the path, as the user's
    data, sources = read_yaml_with_sources(config, label)
    if probe is not None and data.get("probe") not in (None, probe):
        raise UserError(f"--probe {probe} differs from the probe of {config} ({data['probe']})")
    for key, value in flags.items():
        if value not in (None, [], ()):
            data[key] = value
            sources.record((key,), FLAG_NAMES.get(key, "--" + key.replace("_", "-")))
    return tune_spec_from_dict(apply_overrides(data, list(overrides), sources), sources), sources


# --------------------------------------------------------------------------- search space


@dataclass(frozen=True)
class SearchDimension:
    """One searched key, resolved against the params class."""

    key: str  # as written in the space, and the key of a Tune trial's config
    field: str  # the params field it sets
    as_list: bool  # the field is a sweep list: a trial sets [value]
    distribution: str
    low: float | None
    high: float | None
    values: tuple[Any, ...] | None
    grid: tuple[Any, ...] | None

    def span(self) -> tuple[float, float]:
        """(low, high) of a range dimension."""
        if self.low is None or self.high is None:
            raise TypeError(f"space.{self.key} is a choice; it has no low and high")
        return self.low, self.high

    def choices(self) -> list[Any]:
        """The values of a choice dimension."""
        if self.values is None:
            raise TypeError(f"space.{self.key} is a range; it has no values")
        return list(self.values)

    def bounds(self) -> list[Any]:
        """The values every trial value lies between (low, high), or all choices."""
        if self.distribution == "choice":
            return self.choices()
        low, high = self.span()
        if self.distribution in ("int", "logint"):
            return [int(low), int(high)]
        return [low, high]

    def grid_values(self, points: int) -> list[Any]:
        if self.grid is not None:
            return list(self.grid)
        if self.distribution == "choice":
            return self.choices()
        low, high = self.span()
        if self.distribution in ("loguniform", "logint"):
            ratio = (high / low) ** (1 / (points - 1))
            raw = [low * ratio**i for i in range(points)]
        else:
            raw = [low + (high - low) * i / (points - 1) for i in range(points)]
        if self.distribution in ("int", "logint"):
            return sorted({round(v) for v in raw})
        return [round(v, 10) for v in raw]


@dataclass(frozen=True)
class SearchSpace:
    """A probe, its fixed params and searched dimensions; turns a trial's config into params."""

    probe: str
    fixed: dict[str, Any]
    dimensions: tuple[SearchDimension, ...]

    def raw_params(self, config: dict[str, Any]) -> dict[str, Any]:
        """Fixed params plus the trial's values, as a run config's `params:` would hold them."""
        raw = json.loads(json.dumps(self.fixed))
        for dim in self.dimensions:
            value = config[dim.key]
            value = value.item() if hasattr(value, "item") else value  # numpy scalars from the searcher
            raw[dim.field] = [value] if dim.as_list else value
        return raw

    def params_for(self, config: dict[str, Any]) -> ProbeParams:
        return parse_params(self.probe, self.raw_params(config))

    def row_params_json(self, config: dict[str, Any]) -> str:
        """The `params` column of the rows a trial makes: the probe may rewrite its params per row
        (expand_params: a one-candidate sweep has no selector), so this is what `engine run` writes."""
        params = self.params_for(config)
        expanded = sorted({p.canonical_json() for p in get_probe_class(self.probe)().expand_params(params)})
        return expanded[0] if len(expanded) == 1 else json.dumps([json.loads(e) for e in expanded])

    def grid(self, points: int) -> dict[str, list[Any]]:
        return {dim.key: dim.grid_values(points) for dim in self.dimensions}


def parse_space(spec: TuneSpec, where: str | Sources) -> SearchSpace:
    """Resolve and check spec.space against the probe's params class. Raises UserError.

    `where` names the config; a Sources (from load_tune_spec) also names the flag or `--set`
    that wrote a bad key."""
    sources = where if isinstance(where, Sources) else Sources(where)
    params_class = get_probe_class(spec.probe).params_class
    parse_params(spec.probe, spec.params, lambda loc: sources.of(("params", *loc)))  # fixed params alone valid
    dimensions: list[SearchDimension] = []
    for key, dimension in spec.space.items():
        at = sources.of(("space", key), deep=True)
        field, as_list = _resolve_key(key, params_class, spec.probe, at)
        if field in spec.params:
            raise UserError(f"{at}: {field!r} is both fixed in params and searched in space.{key}; keep one")
        if field in [d.field for d in dimensions]:
            raise UserError(f"{at}: space sets {field!r} twice; keep one key for it")
        kind = _element_kind(params_class.model_fields[field].annotation)
        dimensions.append(_search_dimension(key, field, as_list, kind, dimension, f"{at}: space.{key}"))
    where = str(where)
    space = SearchSpace(spec.probe, dict(spec.params), tuple(dimensions))
    _check_corners(space, where)
    if spec.algorithm == "grid":
        _check_grid(space, spec.grid_points, where)
    return space


def _resolve_key(key: str, params_class: type[ProbeParams], probe: str, where: str) -> tuple[str, bool]:
    fields = params_class.model_fields
    candidates = [key, f"{key}s", f"{key}_values"]
    for name in candidates:
        if name in fields and (name == key or _is_list(fields[name].annotation)):
            return name, _is_list(fields[name].annotation)
    singular = [_singular(n) for n, info in fields.items() if _is_list(info.annotation)]
    valid = sorted(set(fields) | {s for s in singular if s})
    raise UserError(f"{where}: unknown key space.{key} for probe {probe}; valid keys: {', '.join(valid)}")


def _singular(name: str) -> str | None:
    if name.endswith("_values"):
        return name[: -len("_values")]
    if name.endswith("s"):
        return name[:-1]
    return None


def _is_list(annotation) -> bool:
    return typing.get_origin(annotation) in (list, tuple)


def _element_kind(annotation) -> str:
    """'int', 'float' or 'other' for a field (a list field: its elements; Optional unwrapped)."""
    if _is_list(annotation):
        annotation = (typing.get_args(annotation) or (Any,))[0]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = members[0] if len(members) == 1 else Any
    if annotation is bool:
        return "other"
    if annotation is int:
        return "int"
    if annotation is float:
        return "float"
    return "other"


def _search_dimension(key: str, field: str, as_list: bool, kind: str, dimension: ChoiceDimension | RangeDimension,
                      where: str) -> SearchDimension:
    grid = tuple(dimension.grid) if dimension.grid is not None else None
    if isinstance(dimension, ChoiceDimension):
        return SearchDimension(key, field, as_list, "choice", None, None, tuple(dimension.values), grid)
    try:
        distribution = dimension.resolved(field, kind)
    except ValueError as error:
        raise UserError(f"{where}: {error}") from None
    return SearchDimension(key, field, as_list, distribution, dimension.low, dimension.high, None, grid)


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else repr(value)


def _check_corners(space: SearchSpace, where: str) -> None:
    """Every combination of each dimension's extremes (or choices) must be valid params: the
    params class's own limits (eta >= 0, mask_size <= 512, hand-over step < steps) are checked
    here, not discovered by a failing trial."""
    bounds = [dim.bounds() for dim in space.dimensions]
    corners = math.prod(len(b) for b in bounds)
    if corners > MAX_GRID_POINTS:
        raise UserError(f"{where}: the search space has {corners} corners to check (more than {MAX_GRID_POINTS}); "
                        "list fewer choice values")
    for corner in itertools.product(*bounds):
        config = {dim.key: value for dim, value in zip(space.dimensions, corner, strict=False)}
        _check_point(space, config, where, "the search space")


def _check_grid(space: SearchSpace, points: int, where: str) -> None:
    grid = space.grid(points)
    size = math.prod(len(v) for v in grid.values())
    if size > MAX_GRID_POINTS:
        raise UserError(f"{where}: the grid has {size} points (more than {MAX_GRID_POINTS}); shorten `grid:` lists")
    for values in itertools.product(*grid.values()):
        _check_point(space, dict(zip(grid, values, strict=False)), where, "the grid")


def _check_point(space: SearchSpace, config: dict[str, Any], where: str, what: str) -> None:
    try:
        space.params_for(config)
    except UserError as error:
        point = ", ".join(f"{k}={v}" for k, v in config.items())
        raise UserError(f"{where}: {what} reaches invalid params at {point}: {error}") from None
