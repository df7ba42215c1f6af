"""Judge references as run configs write them, and the names they may use.

A judge is referred to as

    clip                                    the judge with its defaults (real weights)
    clip:tiny                               a named preset of the judge (here: random test model)
    {name: clip, preset: tiny, options: {seed: 1}}   preset and/or options spelled out

Part of the base layer: run specs (engine.specs.runs) validate judge names here without importing any
judge; engine.scoring.registry loads the classes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from engine.errors import format_validation_error, unknown_choice

# Adding a judge: its module (a Judge subclass), one line here, its test.
JUDGE_REGISTRY: dict[str, str] = {
    "clip": "engine.scoring.clip_judge:ClipJudge",
    "imagenet": "engine.scoring.imagenet_judge:ImagenetJudge",
    "toy": "engine.scoring.toy_judge:ToyClassifierJudge",
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


def default_judge_refs() -> list[str | JudgeRequest]:
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


def judge_requests(refs: Sequence[str | JudgeRequest | dict[str, Any]]) -> list[JudgeRequest]:
    return [parse_judge_ref(ref) for ref in refs]
