"""Best-of-N selectors: the model that picks which candidate a probe keeps (docs/deviations.md).

The original picked with the same ResNet-50 that later judged, which inflates recovery. Here a
probe's `selector` parameter names one of:
- `judge`: the run's classifier judge (e.g. imagenet), ranking by probability of the concept's
  classes. This reproduces the original, selection bias included. A concept without classes for
  that judge (a style, an interference target) falls back to the CLIP judge, and its rows record
  `judge->clip=<clip model>` so the table names the fallback;
- `clip`: the run's CLIP judge, ranking by CLIP score (selects with one model, judges with another);
- `latent_classifier`: the concept's latent classifier (trained by `engine train-classifier`) on the
  candidate's clean latent (engine.scoring.latent_selector);
- `none`: no ranking; every candidate scores 0, so argmax keeps candidate 0.
Every row records the selector and its model in column `selector`, e.g. `clip=clip:ViT-B-32/openai`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, cast, get_args

import numpy as np

from engine.errors import UserError, unknown_choice
from engine.scoring.registry import JudgeRequest, build_judge, get_judge_class
from engine.scoring.scorer import crop_to_region

if TYPE_CHECKING:
    import torch

    from engine.probe import ProbeContext
    from engine.scoring.judge import ClassifierJudge, Judge
    from engine.scoring.latent_selector import SelectorModel
    from engine.specs.concepts import ConceptSpec

logger = logging.getLogger(__name__)

# Use this as the type of a probe params' `selector` field: unknown names are then rejected when
# the run config is validated.
SelectorName = Literal["judge", "clip", "latent_classifier", "none"]
SELECTOR_NAMES: tuple[str, ...] = get_args(SelectorName)
SELECTOR_SLOTS = {"judge": "classifier", "clip": "clip"}  # selectors that reuse a judge of the run
FALLBACK = "judge->clip"  # recorded name of the judge selector on a concept its judge has no classes for


def _check_latent_classifiers(params: Any, concepts: dict[str, ConceptSpec]) -> None:
    from engine.guidance.latent_classifier_io import DEFAULT_CLASSIFIER_DIR, classifier_exists

    folder = getattr(params, "classifier_dir", None) or DEFAULT_CLASSIFIER_DIR
    for concept in concepts.values():
        if not classifier_exists(folder, concept.name):
            raise UserError(
                f"selector latent_classifier: no classifier for {concept.name} in {folder}; train one with: "
                f'engine train-classifier "{concept.display_name}" --output-dir {folder}'
            )


def _slot_request(judges: list[JudgeRequest], slot: str) -> JudgeRequest | None:
    return next((r for r in judges if get_judge_class(r.name).slot == slot), None)


def check_selectors(probe_params: list[Any], judges: list[JudgeRequest], concepts: dict[str, ConceptSpec]) -> None:
    """Driver-side, before any work: every probe params' `selector` (the field name best-of-N probes
    use) is known, and the model it needs is in the run. Raises UserError."""
    for params in probe_params:
        _check_stop(params, judges, concepts)
        selector = getattr(params, "selector", None)
        if selector is None or getattr(params, "keep_all_candidates", False):
            continue  # keeping every candidate as a row selects nothing
        if selector not in SELECTOR_NAMES:
            raise unknown_choice("selector", selector, SELECTOR_NAMES)
        if selector == "latent_classifier":
            _check_latent_classifiers(params, concepts)
        if selector not in SELECTOR_SLOTS:
            continue
        request = _slot_request(judges, SELECTOR_SLOTS[selector])
        if request is None:
            raise UserError(
                f"selector {selector!r} uses the run's {SELECTOR_SLOTS[selector]} judge, but the run has none; "
                f"add one to `judges:` or pick another selector"
            )
        key = getattr(get_judge_class(request.name), "classes_key", None)
        without = [c.name for c in concepts.values() if key is not None and key not in c.judge_classes]
        if without and _slot_request(judges, "clip") is None:
            raise UserError(
                f"selector {selector!r} ranks by the {request.name} judge's classes; {', '.join(without)} "
                "have none, and the run has no clip judge to fall back to for them: add clip to `judges:`"
            )


def _check_stop(params: Any, judges: list[JudgeRequest], concepts: dict[str, ConceptSpec]) -> None:
    """`stop: on_hit` (engine.best_of_n_stop) asks the run's classifier judge after every round: refused
    without one; concepts it has no classes for are named, since their prompts run the full sweep."""
    if getattr(params, "stop", "none") != "on_hit":
        return
    request = _slot_request(judges, "classifier")
    if request is None:
        raise UserError("stop: on_hit stops a prompt when the run's classifier judge recognises a candidate, but "
                        "the run has none; add one to `judges:` (e.g. imagenet) or leave stop at none")
    key = getattr(get_judge_class(request.name), "classes_key", None)
    without = [c.name for c in concepts.values() if key is not None and key not in c.judge_classes]
    if without:
        logger.warning("stop: on_hit: the %s judge has no classes for %s; their prompts run the full sweep",
                       request.name, ", ".join(without))


class SelectorBank:
    """Lazily built, cached selector models of one probe actor; remembers which selectors ran."""

    def __init__(
        self,
        judges: list[JudgeRequest],
        concepts: dict[str, ConceptSpec],
        device: torch.device,
        context: Callable[[], ProbeContext],
    ):
        self.judges = judges
        self.concepts = concepts
        self.device = device
        self.context = context
        self._judge_models: dict[str, Judge] = {}
        self._latent_models: dict[str, SelectorModel] = {}
        self._used: dict[str, set[str]] = {}  # concept -> selectors (with models) used on it

    def _judge(self, selector: str) -> Judge:
        slot = SELECTOR_SLOTS[selector]
        if slot not in self._judge_models:
            request = _slot_request(self.judges, slot)
            if request is None:
                raise UserError(f"selector {selector!r} needs a {slot} judge in the run's `judges:`")
            self._judge_models[slot] = build_judge(request, self.device)
        return self._judge_models[slot]

    def _latent(self, concept: ConceptSpec) -> SelectorModel:
        # Imported on first use: it loads torch and a VAE, which validation never needs.
        from engine.scoring.latent_selector import latent_classifier_selector

        context = self.context()
        key = f"{context.options.get('classifier_dir')}/{concept.name}"
        if key not in self._latent_models:
            self._latent_models[key] = latent_classifier_selector(concept, context)
        return self._latent_models[key]

    def _judge_knows(self, concept: ConceptSpec) -> bool:
        """Whether the classifier judge has classes for `concept` (else judge selection falls back to CLIP)."""
        # The `judge` selector's slot is `classifier`, which only a ClassifierJudge fills.
        judge = cast("ClassifierJudge[Any]", self._judge("judge"))
        return judge.target_classes(concept) is not None

    def scores(
        self,
        selector: str,
        images: list[np.ndarray],
        concept_name: str,
        regions: list[list[int] | tuple[int, ...] | None] | None = None,
    ) -> list[float]:
        """One score per image (cropped to its region), higher = more of the concept."""
        if selector not in SELECTOR_NAMES:
            raise unknown_choice("selector", selector, SELECTOR_NAMES)
        if concept_name not in self.concepts:
            raise KeyError(f"selector asked about concept {concept_name!r}, which is not in this run")
        concept = self.concepts[concept_name]
        crops = [crop_to_region(image, region)
                 for image, region in zip(images, regions or [None] * len(images), strict=False)]
        used = self._used.setdefault(concept_name, set())
        if selector == "none":
            used.add("none")
            return [0.0] * len(images)
        if selector == "judge" and not self._judge_knows(concept):
            judge = self._judge("clip")  # per concept: this one has no classes for the classifier judge
            used.add(f"{FALLBACK}={judge.model_id}")
            return judge.concept_scores(crops, concept) if crops else []
        if selector in SELECTOR_SLOTS:
            judge = self._judge(selector)
            used.add(f"{selector}={judge.model_id}")
            return judge.concept_scores(crops, concept) if crops else []
        model = self._latent(concept)
        used.add(f"latent_classifier={model.model_id}")
        return [float(v) for v in model.scores(crops)]

    def judge_hits(
        self,
        images: list[np.ndarray],
        concept_name: str,
        regions: list[list[int] | tuple[int, ...] | None] | None = None,
        record_selection: bool = False,
    ) -> list[bool] | None:
        """Per image (cropped to its region): does the run's classifier judge recognise the concept
        (top-1 in its classes)? None when the run has no classifier judge or the concept has no classes
        for it. Not recorded in the `selector` column, unless `record_selection` says the probe keeps
        an image because of these hits (an attack that stops at its first success): then the rows get
        `judge=<model id>`, and reports mark their judge columns as selection-inflated."""
        if _slot_request(self.judges, "classifier") is None:
            return None
        if concept_name not in self.concepts:
            raise KeyError(f"judge hits asked about concept {concept_name!r}, which is not in this run")
        # The `judge` selector's slot is `classifier`, which only a ClassifierJudge fills.
        judge = cast("ClassifierJudge[Any]", self._judge("judge"))
        if record_selection:
            self._used.setdefault(concept_name, set()).add(f"judge={judge.model_id}")
        crops = [crop_to_region(image, region)
                 for image, region in zip(images, regions or [None] * len(images), strict=False)]
        return judge.top1_hits(crops, self.concepts[concept_name])

    def take_used(self) -> dict[str, str]:
        """Per concept, the selectors used on it since the last call, as written in column `selector`
        of its rows (a concept no selector ran on is absent). Per concept, since judge selection falls
        back to CLIP on concepts without judge classes."""
        labels = {concept: "+".join(sorted(used)) for concept, used in self._used.items() if used}
        self._used.clear()
        return labels
