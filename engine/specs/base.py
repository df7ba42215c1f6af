"""The base of every config model, and validation with one-line errors."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, ValidationError

from engine.errors import format_validation_error

if TYPE_CHECKING:
    from engine.specs.sources import Sources


class Frozen(BaseModel):
    """Base of every config model: immutable, unknown keys rejected, and no NaN or infinity in any
    float field (list items and union members included), so `eta: .nan` fails before any work."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)



def validate(model: type[BaseModel], data: dict[str, Any], where: str | Sources):
    """`model` from `data`, or a one-line UserError naming where each bad value came from."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise format_validation_error(exc, where, model) from None

