"""The judge registry: name -> "module:Class", judge requests as written in run configs, preflight.

Registration is explicit and lazy (as engine.probe's PROBE_REGISTRY), so validating a run config
imports neither torch nor open_clip. A judge is referred to as

    clip                                    the judge with its defaults (real weights)
    clip:tiny                               a named preset of the judge (here: random test model)
    {name: clip, preset: tiny, options: {seed: 1}}   preset and/or options spelled out

Real-weight judges check in the driver, before any generation, that their weights are present
(downloading them once when the machine is online); a missing weight is a UserError, never a
silent switch to another model.
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from engine.errors import UserError, format_validation_error, unknown_choice

if TYPE_CHECKING:
    import torch

    from engine.concepts import ConceptSpec
    from engine.scoring.judge import Judge, JudgeOptions

logger = logging.getLogger(__name__)

# Adding a judge: its module (a Judge subclass), one line here, its test.
JUDGE_REGISTRY: dict[str, str] = {
    "clip": "engine.scoring.clip_judge:ClipJudge",
    "imagenet": "engine.scoring.imagenet_judge:ImagenetJudge",
    "toy": "engine.toyworld.scoring_judge:ToyClassifierJudge",
}

DEFAULT_JUDGES = ["clip", "imagenet"]
# Comma-separated judge references used when a run config has no `judges:` key (the test suite
# sets "clip:tiny,imagenet:tiny" so runs need no downloaded weights). Explicit, never a fallback.
JUDGES_ENV = "ENGINE_JUDGES"


class JudgeRequest(BaseModel):
    """One judge of a run: registered name, optional preset, options on top of the preset."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(description="Registered judge name, e.g. clip or imagenet.")
    preset: str | None = Field(None, description="Named option set of the judge, e.g. tiny (random test model).")
    options: dict[str, Any] = Field(default_factory=dict, description="Judge options (see `engine judges`).")

    def label(self) -> str:
        return self.name if self.preset is None else f"{self.name}:{self.preset}"


def judge_names() -> list[str]:
    return sorted(JUDGE_REGISTRY)


def default_judge_refs() -> list[str]:
    raw = os.environ.get(JUDGES_ENV)
    if raw is None:
        return list(DEFAULT_JUDGES)
    return [part.strip() for part in raw.split(",") if part.strip()]


def parse_judge_ref(ref: str | JudgeRequest | dict[str, Any]) -> JudgeRequest:
    """`name`, `name:preset`, a mapping or a JudgeRequest -> JudgeRequest with a known name."""
    if isinstance(ref, JudgeRequest):
        request = ref
    elif isinstance(ref, dict):
        try:
            request = JudgeRequest.model_validate(ref)
        except ValidationError as exc:
            raise format_validation_error(exc, "judge", JudgeRequest) from None
    else:
        name, _, preset = str(ref).partition(":")
        request = JudgeRequest(name=name.strip(), preset=preset.strip() or None)
    if request.name not in JUDGE_REGISTRY:
        raise unknown_choice("judge", request.name, JUDGE_REGISTRY)
    return request


def judge_requests(refs: list[str | JudgeRequest | dict[str, Any]]) -> list[JudgeRequest]:
    return [parse_judge_ref(ref) for ref in refs]


def get_judge_class(name: str) -> type[Judge]:
    if name not in JUDGE_REGISTRY:
        raise unknown_choice("judge", name, JUDGE_REGISTRY)
    module_name, class_name = JUDGE_REGISTRY[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def judge_options(request: JudgeRequest) -> JudgeOptions:
    """The validated options of a request: the judge's defaults, then its preset, then `options`."""
    judge_class = get_judge_class(request.name)
    raw: dict[str, Any] = {}
    if request.preset is not None:
        if request.preset not in judge_class.presets:
            raise unknown_choice(f"preset for judge {request.name}", request.preset, judge_class.presets)
        raw.update(judge_class.presets[request.preset])
    raw.update(request.options)
    try:
        return judge_class.options_class.model_validate(raw)
    except ValidationError as exc:
        raise format_validation_error(exc, f"judge {request.label()} options", judge_class.options_class) from None


def build_judge(request: JudgeRequest, device: torch.device) -> Judge:
    """An unloaded judge (weights load on first use, in the process that scores)."""
    return get_judge_class(request.name)(judge_options(request), device)


def check_judges(requests: list[JudgeRequest], concepts: dict[str, ConceptSpec]) -> None:
    """Driver-side preflight: options valid, one judge per score slot, every object concept has
    classes for each classifier judge, and real weights present. Raises UserError."""
    slots: dict[str, str] = {}
    for request in requests:
        judge_class = get_judge_class(request.name)
        options = judge_options(request)
        if judge_class.slot in slots:
            raise UserError(
                f"judges {slots[judge_class.slot]} and {request.label()} both write the {judge_class.slot} "
                "score columns; keep one of them"
            )
        slots[judge_class.slot] = request.label()
        judge_class.check_concepts(options, concepts)
        judge_class.check_available(options)
