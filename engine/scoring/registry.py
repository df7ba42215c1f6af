"""The judge registry: judge classes loaded by name ("module:Class" in engine.specs.judges), their
options and presets, and the driver's preflight.

Registration is explicit and lazy (as engine.probe's PROBE_REGISTRY), so validating a run config
imports neither torch nor open_clip.

Real-weight judges check in the driver, before any generation, that their weights are present
(downloading them once when the machine is online); a missing weight is a UserError, never a
silent switch to another model.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from engine.errors import UserError, format_validation_error, unknown_choice
from engine.specs.judges import (  # noqa: F401  (re-exported: the registry's public names)
    DEFAULT_JUDGES,
    JUDGE_REGISTRY,
    JUDGES_ENV,
    JudgeRequest,
    default_judge_refs,
    judge_names,
    judge_requests,
    parse_judge_ref,
)

if TYPE_CHECKING:
    import torch

    from engine.scoring.judge import Judge, JudgeOptions
    from engine.specs.concepts import ConceptSpec

logger = logging.getLogger(__name__)

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
