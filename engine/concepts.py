"""Concepts and the config-file helpers every layer reads: folders, YAML, validation.

The base layer: it imports nothing of the engine but engine.errors, so run and model specs
(engine.config), scoring and probes can all build on it. Data-like entries are one file each,
found by file stem: configs/concepts/<id>.yaml.
"""

from __future__ import annotations

import importlib
import importlib.resources
import os
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from engine.errors import UserError, format_validation_error, unknown_choice


class Frozen(BaseModel):
    """Base of every config model: immutable, unknown keys rejected, and no NaN or infinity in any
    float field (list items and union members included), so `eta: .nan` fails before any work."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


# --------------------------------------------------------------------------- config folders


SHIPPED = "shipped"


@dataclass(frozen=True)
class ConfigFile:
    """One config file and where it was found: `shipped`, `./configs` or `$ENGINE_CONFIG_DIR <folder>`."""

    path: Path
    source: str


def shipped_config_dir() -> Path | None:
    """The configs the engine ships: the `configs` package's folder, read through importlib.resources,
    so an installed wheel finds them. An editable install made before `configs` became a package does
    not map it; the source tree's folder next to engine/ stands in then."""
    try:
        package = importlib.import_module("configs")
    except ImportError:
        package = None
    if getattr(package, "ENGINE_SHIPPED_CONFIGS", False):  # not some other project's `configs`
        folder = Path(str(importlib.resources.files(package)))
        if folder.is_dir():
            return folder
    source_tree = Path(__file__).resolve().parent.parent / "configs"
    return source_tree if source_tree.is_dir() else None


def config_sources() -> list[tuple[Path, str]]:
    """(folder, source label) searched for configs, first match wins: $ENGINE_CONFIG_DIR entries,
    ./configs, then the shipped configs. A folder that is the shipped one is labelled `shipped`."""
    env_dirs = [p for p in os.environ.get("ENGINE_CONFIG_DIR", "").split(os.pathsep) if p]
    candidates = [(Path(p), f"$ENGINE_CONFIG_DIR {p}") for p in env_dirs]
    candidates.append((Path.cwd() / "configs", "./configs"))
    shipped = shipped_config_dir()
    if shipped is not None:
        candidates.append((shipped, SHIPPED))
    shipped_key = shipped.resolve() if shipped is not None else None
    unique: dict[Path, tuple[Path, str]] = {}
    for folder, label in candidates:
        if not folder.is_dir() or folder.resolve() in unique:
            continue
        unique[folder.resolve()] = (folder, SHIPPED if folder.resolve() == shipped_key else label)
    return list(unique.values())


def config_dirs() -> list[Path]:
    """Folders searched for configs, first match wins: $ENGINE_CONFIG_DIR entries, ./configs, the shipped ones."""
    return [folder for folder, _ in config_sources()]


def find_config_entries(kind: str) -> dict[str, ConfigFile]:
    """All `<kind>/<stem>.yaml` files with where each came from, keyed by stem (earlier folders shadow later ones)."""
    found: dict[str, ConfigFile] = {}
    for folder, label in reversed(config_sources()):
        for path in sorted((folder / kind).glob("*.yaml")):
            found[path.stem] = ConfigFile(path, label)
    return found


def find_config_files(kind: str) -> dict[str, Path]:
    """All `<kind>/<stem>.yaml` files, keyed by stem (earlier folders shadow later ones)."""
    return {stem: entry.path for stem, entry in find_config_entries(kind).items()}


def read_yaml(path: Path) -> dict[str, Any]:
    return read_yaml_with_sources(path)[0]


def read_yaml_with_sources(path: Path, label: str | None = None) -> tuple[dict[str, Any], Sources]:
    """A YAML file's top-level mapping, and the line of every key in it (so an error can point at
    `run.yaml:7`). Syntax errors name the file, line and column; a key written twice is an error
    (PyYAML would silently keep the last)."""
    label = label or str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise UserError(f"{label}: is a folder, not a YAML file") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{label}: not a UTF-8 text file (byte {exc.start}: {exc.reason})") from None
    except (OSError, ValueError) as exc:  # permissions, a NUL byte or an over-long name in the path
        raise UserError(f"{label}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None
    loader = None
    try:
        loader = yaml.SafeLoader(text)  # checks every character: may raise a ReaderError already
        node = loader.get_single_node()
        sources = Sources(label)
        if node is not None:
            _record_key_lines(loader, node, (), sources, label, set())
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        raise UserError(yaml_error_line(label, exc, text)) from None
    except RecursionError:  # deeply nested flow collections: the parser recurses per level
        raise UserError(f"{label}: malformed YAML (nested too deeply)") from None
    finally:
        if loader is not None:
            loader.dispose()
    if not isinstance(data, dict):
        raise UserError(f"{label}: expected a mapping of keys at the top level")
    return data, sources


def yaml_error_line(label: str, exc: yaml.YAMLError, text: str) -> str:
    """One line for a YAML error: `FILE:LINE:COLUMN: malformed YAML: PROBLEM (CONTEXT)`, 1-based."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        where = f"{label}:{mark.line + 1}:{mark.column + 1}"
        problem = exc.problem or "invalid syntax"
        if exc.context and exc.context_mark is not None and exc.context_mark.line != mark.line:
            problem += f" ({exc.context} that starts at line {exc.context_mark.line + 1}, " \
                       f"column {exc.context_mark.column + 1})"
        elif exc.context:
            problem += f" ({exc.context})"
        return f"{where}: malformed YAML: {problem}"
    position = getattr(exc, "position", None)
    if isinstance(position, int):  # a ReaderError: an unprintable character
        line = text.count("\n", 0, position) + 1
        column = position - (text.rfind("\n", 0, position) + 1) + 1
        reason = getattr(exc, "reason", None) or "unreadable character"
        return f"{label}:{line}:{column}: malformed YAML: {reason}"
    return f"{label}: malformed YAML: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"


def _record_key_lines(
    loader: yaml.SafeLoader, node, path: tuple, sources: Sources, label: str, seen_nodes: set
) -> None:
    """Walk the node tree: record `label:LINE` for every mapping key and sequence item. An aliased
    node is walked once (aliases of aliases would otherwise make the walk exponential)."""
    if id(node) in seen_nodes:
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue
            key = loader.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise UserError(
                    f"{label}:{line}:{key_node.start_mark.column + 1}: key {key!r} is written twice "
                    f"(first at line {seen[key]}); keep one"
                )
            seen[key] = line
            sources.record((*path, key), f"{label}:{line}")
            _record_key_lines(loader, value_node, (*path, key), sources, label, seen_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            sources.record((*path, index), f"{label}:{item.start_mark.line + 1}")
            _record_key_lines(loader, item, (*path, index), sources, label, seen_nodes)


def validate(model: type[BaseModel], data: dict[str, Any], where: str | Sources):
    """`model` from `data`, or a one-line UserError naming where each bad value came from."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise format_validation_error(exc, where, model) from None


class Sources:
    """Where each key of a merged config came from: a file line, a flag, a `--set`.

    Keys are paths as pydantic reports them, ("probes", 0, "params", "eta_values"). A key's
    label is the one recorded for its longest recorded prefix, else `default`. Recording a key
    again (a flag over the file's value) drops what was recorded beneath it.
    """

    def __init__(self, default: str):
        self.default = default
        self._labels: dict[tuple, str] = {}

    def __str__(self) -> str:
        return self.default

    def __call__(self, loc: tuple) -> str:
        return self.of(loc)

    def record(self, key: tuple | str, label: str) -> None:
        key = (key,) if isinstance(key, str) else tuple(key)
        for recorded in [k for k in self._labels if k[: len(key)] == key]:
            del self._labels[recorded]
        self._labels[key] = label

    def of(self, loc: tuple, deep: bool = False) -> str:
        """The label of `loc`; with deep=True also those of every key recorded beneath it that
        a flag or `--set` changed (a check of a whole entry may be failed by one of its parts)."""
        loc = tuple(loc)
        label = self.default
        for size in range(len(loc), 0, -1):
            if loc[:size] in self._labels:
                label = self._labels[loc[:size]]
                break
        if not deep:
            return label
        beneath = [v for k, v in self._labels.items() if len(k) > len(loc) and k[: len(loc)] == loc]
        extra = [v for v in dict.fromkeys(beneath) if v != label and not v.startswith(self.default)]
        return ", ".join([label, *extra])


# --------------------------------------------------------------------------- concepts


DEFAULT_CONCEPT_SET = "default"


class PythonRandomSeeds(Frozen):
    """The original's seed list: random.seed(seed), then `count` x randint(low, high)."""

    seed: int = 42
    count: int = Field(500, ge=1)
    low: int = 1
    high: int = 10000

    def values(self) -> list[int]:
        return list(_python_random_seeds(self.seed, self.count, self.low, self.high))


@lru_cache(maxsize=None)
def _python_random_seeds(seed: int, count: int, low: int, high: int) -> tuple[int, ...]:
    rng = random.Random(seed)
    return tuple(rng.randint(low, high) for _ in range(count))


@lru_cache(maxsize=None)
def _permutation(random_state: int, length: int) -> tuple[int, ...]:
    """numpy RandomState(random_state).permutation(length), as pandas' sample(n, random_state) draws."""
    return tuple(int(i) for i in np.random.RandomState(random_state).permutation(length))


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
    concept_set: str = Field(
        DEFAULT_CONCEPT_SET,
        description="The set the concept belongs to: interference draws the other concepts of the same set "
        "(the original's 13 share the default set; the toy world's 8 are `toy`). Sets never mix.",
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
        order = _permutation(self.sample_random_state, len(seeds))[:n]
        return [(i, self.prompt, seeds[i]) for i in order]

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


def concept_set_members(concept: ConceptSpec) -> dict[str, ConceptSpec]:
    """Every configured concept of `concept`'s set (itself included), by name in sorted order: the
    world an erased model's interference rows are drawn from, whatever a run lists."""
    members = {}
    for name, path in sorted(available_concepts().items()):
        other = concept if name == concept.name else _load_concept_file(path)
        if other.concept_set == concept.concept_set:
            members[name] = other
    return members
