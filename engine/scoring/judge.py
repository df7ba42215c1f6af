"""Judge base classes and the score columns each kind of judge fills.

A judge fills one *slot* of the results schema:
- slot "clip": `clip_score` (+ `clip_model`), a similarity between image and concept text;
- slot "classifier": `judge_top1`, `judge_top5`, `judge_target_prob` (+ `judge_model`): hits of the
  concept's exact class indices, taken from `ConceptSpec.judge_classes[<classes_key>]`.
A new classifier judge (e.g. the toy world's) subclasses ClassifierJudge, names its classes_key and
implements `probabilities`; the top-k arithmetic lives here, once.
"""

from __future__ import annotations

import hashlib
import os
import threading
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict

from engine.errors import UserError
from engine.metrics.columns import MODEL_COLUMNS, TOP5_CLASSES, TOP5_PROBS, slot_metrics

if TYPE_CHECKING:
    import torch

    from engine.specs.concepts import ConceptSpec

# Per slot: the value columns a judge returns, the column naming the judge, and the per-row
# reductions over best-of-N candidates (candidate column -> value column it averages). All from
# engine.metrics.columns, where every score column is declared.
SLOT_COLUMNS: dict[str, list[str]] = {slot: [m.column for m in slot_metrics(slot)] for slot in MODEL_COLUMNS}
MODEL_COLUMN: dict[str, str] = MODEL_COLUMNS
CANDIDATE_COLUMNS: dict[str, dict[str, str]] = {
    slot: {m.candidate_column: m.column for m in slot_metrics(slot) if m.candidate_column} for slot in MODEL_COLUMNS
}


# Columns a judge may add beside its slot's metrics: the five most probable classes and their
# probabilities (null where the judge did not rank the image).
TOP5_COLUMNS = (TOP5_CLASSES, TOP5_PROBS)


def top5_rankings(probs: np.ndarray | None) -> list[tuple[list[int], list[float]]]:
    """Per row of an N x C probability matrix: (top-5 class indices, their probabilities), most
    probable first, ties in class order (the stable sort judge_top1 uses)."""
    if probs is None:
        return []
    rankings = []
    for p in probs:
        top = np.argsort(-p, kind="stable")[:5]
        rankings.append(([int(c) for c in top], [float(p[c]) for c in top]))
    return rankings


class JudgeOptions(BaseModel):
    """Options every judge validates strictly: frozen, unknown keys rejected, floats finite."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


# A judge's own options class: Judge is generic over it, so `self.options` has its fields.
OptionsT = TypeVar("OptionsT", bound=JudgeOptions)


class Judge(ABC, Generic[OptionsT]):
    """Scores uint8 HxWx3 images (already cropped to their scoring region) against concepts."""

    name: ClassVar[str]
    slot: ClassVar[str]
    options_class: ClassVar[type[JudgeOptions]] = JudgeOptions
    presets: ClassVar[dict[str, dict[str, Any]]] = {}

    def __init__(self, options: OptionsT, device: torch.device):
        self.options = options
        self.device = device
        self._loaded = False
        self._load_lock = threading.Lock()  # a background prefetch and the first score call never both load

    @classmethod  # an optional hook: most judges need no check
    def check_available(cls, options: OptionsT) -> None:
        """Driver-side, before any work: raise UserError if the weights cannot be had."""

    @classmethod  # an optional hook
    def check_concepts(cls, options: OptionsT, concepts: dict[str, ConceptSpec]) -> None:
        """Driver-side, before any work: raise UserError if a concept cannot be judged."""

    @property
    @abstractmethod
    def model_id(self) -> str:
        """Judge name plus architecture and weights id, written into every scored row."""

    @abstractmethod
    def load(self) -> None:
        """Build the model and its preprocessing (called once, on first use)."""

    @abstractmethod
    def score(self, images: list[np.ndarray], concepts: list[ConceptSpec]) -> dict[str, list[Any]]:
        """One value per image for each of SLOT_COLUMNS[self.slot]; image i is judged against concepts[i]."""

    @abstractmethod
    def concept_scores(self, images: list[np.ndarray], concept: ConceptSpec) -> list[float]:
        """One float per image, higher = more of `concept`: what a best-of-N selector ranks by."""

    def ensure_loaded(self) -> None:
        with self._load_lock:
            if not self._loaded:
                self.load()
                self._loaded = True


class ClassifierJudge(Judge[OptionsT]):
    """A classifier whose classes are listed per concept in `judge_classes[classes_key]`."""

    slot = "classifier"
    classes_key: ClassVar[str]
    num_classes: ClassVar[int]

    @abstractmethod
    def probabilities(self, images: list[np.ndarray]) -> np.ndarray:
        """N x num_classes softmax probabilities."""

    @classmethod
    def class_names(cls) -> list[str] | None:
        """Readable names of the class indices (reports name what was drawn); None: indices only."""
        return None

    @classmethod
    def check_concepts(cls, options: OptionsT, concepts: dict[str, ConceptSpec]) -> None:
        for concept in concepts.values():
            classes = concept.judge_classes.get(cls.classes_key)
            if classes is None:
                if concept.kind == "object":
                    raise UserError(
                        f"concept {concept.name!r} has no judge_classes.{cls.classes_key}; add its exact class "
                        f"indices to its config, or leave the {cls.name} judge out of this run"
                    )
                continue
            bad = [c for c in classes if not 0 <= c < cls.num_classes]
            if bad:
                raise UserError(
                    f"concept {concept.name!r}: judge_classes.{cls.classes_key} has {bad}, "
                    f"outside 0..{cls.num_classes - 1}"
                )

    def target_classes(self, concept: ConceptSpec) -> list[int] | None:
        """The concept's classes for this judge; None (a style) means it is not judged: null, not 0."""
        return concept.judge_classes.get(self.classes_key)

    def score(self, images: list[np.ndarray], concepts: list[ConceptSpec]) -> dict[str, list[Any]]:
        columns: dict[str, list[Any]] = {name: [] for name in [*SLOT_COLUMNS["classifier"], *TOP5_COLUMNS]}
        judged = [i for i, c in enumerate(concepts) if self.target_classes(c) is not None]
        probs = self.probabilities([images[i] for i in judged]) if judged else None
        rows = {index: position for position, index in enumerate(judged)}
        for values in columns.values():
            values.extend([None] * len(concepts))  # filled in place below
        for index, concept in enumerate(concepts):
            if index not in rows:
                continue
            classes = self.target_classes(concept)
            # Rows in `rows` were judged: probabilities exist and the concept has classes.
            assert probs is not None and classes is not None
            p = probs[rows[index]]
            # Stable sort on -p: equal probabilities keep class order, so ties resolve reproducibly.
            ranking = np.argsort(-p, kind="stable")
            columns["judge_top1"][index] = bool(int(ranking[0]) in classes)
            columns["judge_top5"][index] = bool(any(int(c) in classes for c in ranking[:5]))
            columns["judge_target_prob"][index] = float(p[classes].sum())
        # What the image shows, whatever was asked: every image of a judged concept (styles stay null).
        for index, (top_classes, top_probs) in zip(judged, top5_rankings(probs), strict=True):
            columns[TOP5_CLASSES][index] = top_classes
            columns[TOP5_PROBS][index] = top_probs
        return columns

    def top1_hits(self, images: list[np.ndarray], concept: ConceptSpec) -> list[bool] | None:
        """Per image, whether the top-1 class is one of the concept's (judge_top1's rule, ties in class
        order); None when the concept has no classes for this judge."""
        classes = self.target_classes(concept)
        if classes is None:
            return None
        if not images:
            return []
        return [int(np.argsort(-p, kind="stable")[0]) in classes for p in self.probabilities(images)]

    def concept_scores(self, images: list[np.ndarray], concept: ConceptSpec) -> list[float]:
        classes = self.target_classes(concept)
        if classes is None:
            raise ValueError(f"judge {self.name} has no classes for concept {concept.name!r}; it cannot rank it")
        probs = self.probabilities(images)
        return [float(p[classes].sum()) for p in probs]


# --------------------------------------------------------------------------- weight helpers


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def local_weights_file(path_text: str, what: str) -> Path:
    """A user-given weights file: must exist and be safetensors (pickle files are refused)."""
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise UserError(f"{what}: weights file not found: {path}")
    if path.suffix != ".safetensors":
        raise UserError(f"{what}: {path.name} is not a .safetensors file; only safetensors weights load from files")
    return path


def file_weights_id(path: Path) -> str:
    """`file:<name>@<sha256 prefix>`: names the exact weights a row was judged with."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return f"file:{path.name}@{digest.hexdigest()[:12]}"
