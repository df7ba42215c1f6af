"""Model families: one configs/models file that expands a template over methods x concepts.

A family file is a configs/models/<family>.yaml with a `methods:` key:

    pretrained: "DiffusionConceptErasure/{method}_{concept}"
    methods: [esdx, uce]
    concepts: [church, airliner]              # or {slug: id part}, e.g. {toy_circle: circle}
    overrides:                                # per method: another id pattern, a UNet-only checkpoint...
      uce: {revision: main, label: UCE}

Each (method, concept) becomes a model named `<method>_<concept>` that erased `[<concept>]`,
labelled with the method (or the override's `label`). `{method}` and `{concept}` in `pretrained`
and `unet` are filled in; `{concept}` is the concept's id part (the slug unless a mapping says
otherwise). A run lists a family by its file stem (all members) or members by name.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator

from engine.errors import UserError
from engine.specs.base import Frozen, validate
from engine.specs.files import find_config_files
from engine.specs.runs import ModelSpec
from engine.specs.yaml_reader import read_yaml


class MethodOverride(Frozen):
    pretrained: str | None = Field(None, description="This method's id pattern ({method}, {concept}).")
    unet: str | None = Field(None, description="UNet-only checkpoint pattern; `pretrained` is then the base.")
    revision: str | None = Field(None, description="Hub revision of this method's models.")
    label: str | None = Field(None, description="The `method` label of this method's models (default: its name).")
    allow_pickle: bool | None = Field(None, description="Allow pickle weights for this method's models.")


class ModelFamily(Frozen):
    name: str = Field(description="The family's name, equal to its file stem.")
    description: str = Field("", description="What the family is, for `engine models`.")
    pretrained: str = Field(description="Hub id, folder or built-in pattern with {method} and {concept}.")
    unet: str | None = Field(None, description="UNet-only checkpoint pattern; `pretrained` is then the base.")
    revision: str | None = Field(None, description="Hub revision of every member.")
    allow_pickle: bool = Field(False, description="Allow pickle weights for every member.")
    methods: list[str] = Field(min_length=1, description="Method names, as they appear in ids and labels.")
    concepts: list[str] | dict[str, str] = Field(
        min_length=1, description="Concept slugs erased, or {slug: id part} when ids spell them differently."
    )
    overrides: dict[str, MethodOverride] = Field(default_factory=dict, description="Per-method differences.")
    exclude: list[str] = Field(default_factory=list, description="Member names that do not exist.")

    @field_validator("methods")
    @classmethod
    def _methods_once(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"methods listed more than once: {value}")
        return value

    @model_validator(mode="after")
    def _known_keys(self):
        unknown = sorted(set(self.overrides) - set(self.methods))
        if unknown:
            raise ValueError(f"overrides for methods not in `methods`: {', '.join(unknown)}")
        names = {member_name(m, c) for m in self.methods for c in self.concept_ids()}
        stray = sorted(set(self.exclude) - names)
        if stray:
            raise ValueError(f"exclude names no member: {', '.join(stray)}")
        return self

    def concept_ids(self) -> dict[str, str]:
        """Concept slug -> the text that replaces {concept} in ids."""
        return dict(self.concepts) if isinstance(self.concepts, dict) else {c: c for c in self.concepts}

    def members(self) -> dict[str, ModelSpec]:
        """Member name -> spec, methods outer, concepts inner (the file's order)."""
        members = {}
        for method in self.methods:
            override = self.overrides.get(method, MethodOverride())
            for concept, concept_id in self.concept_ids().items():
                name = member_name(method, concept)
                if name in self.exclude:
                    continue
                fill = {"method": method, "concept": concept_id}
                unet = override.unet or self.unet
                members[name] = ModelSpec(
                    name=name,
                    pretrained=self._fill(override.pretrained or self.pretrained, fill),
                    unet=self._fill(unet, fill) if unet else None,
                    method=override.label or method,
                    erased=[concept],
                    revision=override.revision or self.revision,
                    allow_pickle=self.allow_pickle if override.allow_pickle is None else override.allow_pickle,
                )
        return members

    def _fill(self, pattern: str, fill: dict[str, str]) -> str:
        try:
            return pattern.format(**fill)
        except (KeyError, IndexError, ValueError) as error:
            raise UserError(
                f"model family {self.name!r}: pattern {pattern!r} may use only {{method}} and {{concept}} ({error})"
            ) from None


def member_name(method: str, concept: str) -> str:
    return f"{method}_{concept}"


def is_family_data(data: dict[str, Any]) -> bool:
    return "methods" in data


@cache
def _read_family(path: Path, mtime: float) -> ModelFamily:
    data = read_yaml(path)
    data.setdefault("name", path.stem)
    if data["name"] != path.stem:
        raise UserError(f"{path}: name {data['name']!r} must equal the file stem {path.stem!r}")
    return validate(ModelFamily, data, str(path))


@cache
def _members_of(path: Path, mtime: float) -> dict[str, ModelSpec]:
    return _read_family(path, mtime).members()


def model_files() -> tuple[dict[str, Path], dict[str, Path]]:
    """configs/models files split into (single models, families), by stem."""
    singles: dict[str, Path] = {}
    families: dict[str, Path] = {}
    for stem, path in find_config_files("models").items():
        (families if _is_family_file(path, path.stat().st_mtime) else singles)[stem] = path
    return singles, families


@cache
def _is_family_file(path: Path, mtime: float) -> bool:
    return is_family_data(read_yaml(path))


def model_families() -> dict[str, ModelFamily]:
    return {stem: _read_family(path, path.stat().st_mtime) for stem, path in model_files()[1].items()}


def family_members() -> dict[str, ModelSpec]:
    """Every family member by name. A configs/models/<name>.yaml of the same name shadows a member
    (the explicit file wins); a name made by two families is an error, as a run could not say
    which one it means."""
    singles, families = model_files()
    members: dict[str, ModelSpec] = {}
    owner: dict[str, str] = {}
    for path in families.values():
        family = _read_family(path, path.stat().st_mtime)
        for name, spec in _members_of(path, path.stat().st_mtime).items():
            if name in singles:
                continue
            if name in owner:
                raise UserError(f"model {name!r} is made by two families: {owner[name]!r} and {family.name!r}")
            members[name] = spec
            owner[name] = family.name
    return members
