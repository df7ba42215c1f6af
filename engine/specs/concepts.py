"""Concepts: one configs/concepts/<slug>.yaml each, with their prompts, seeds and judge classes."""

from __future__ import annotations

import random
from functools import cache
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, field_validator

from engine.errors import UserError, unknown_choice
from engine.specs.base import Frozen, validate
from engine.specs.files import find_config_files
from engine.specs.yaml_reader import read_yaml

DEFAULT_CONCEPT_SET = "default"


class PythonRandomSeeds(Frozen):
    """The original's seed list: random.seed(seed), then `count` x randint(low, high)."""

    seed: int = 42
    count: int = Field(500, ge=1)
    low: int = 1
    high: int = 10000

    def values(self) -> list[int]:
        return list(_python_random_seeds(self.seed, self.count, self.low, self.high))


@cache
def _python_random_seeds(seed: int, count: int, low: int, high: int) -> tuple[int, ...]:
    rng = random.Random(seed)
    return tuple(rng.randint(low, high) for _ in range(count))


@cache
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


@cache
def load_concept_file(path: Path) -> ConceptSpec:
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
    return load_concept_file(files[name])


def concept_set_members(concept: ConceptSpec) -> dict[str, ConceptSpec]:
    """Every configured concept of `concept`'s set (itself included), by name in sorted order: the
    world an erased model's interference rows are drawn from, whatever a run lists."""
    members = {}
    for name, path in sorted(available_concepts().items()):
        other = concept if name == concept.name else load_concept_file(path)
        if other.concept_set == concept.concept_set:
            members[name] = other
    return members
