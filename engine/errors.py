"""User-facing errors: short, specific, raised before any expensive work."""

from __future__ import annotations

from typing import Iterable

from pydantic import BaseModel


class UserError(Exception):
    """Bad input from the user. The CLI prints the message on one line and exits with code 2."""


def unknown_choice(kind: str, value: str, choices: Iterable[str]) -> UserError:
    valid = ", ".join(sorted(choices)) or "(none)"
    return UserError(f"unknown {kind} {value!r}; valid choices: {valid}")


def format_validation_error(error, where: str, model: type[BaseModel] | None = None) -> UserError:
    """Turn a pydantic ValidationError into one line that names the bad key and value.

    Unknown keys are the most common mistake (a misspelling), so when there are any, only they
    are reported, with the keys that would have been valid.
    """
    items = error.errors()
    unknown = [i for i in items if i["type"] == "extra_forbidden"]
    parts = []
    for item in unknown or items:
        location = ".".join(str(p) for p in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            valid = _valid_keys(model, item["loc"][:-1])
            hint = f"; valid keys: {', '.join(valid)}" if valid else ""
            parts.append(f"unknown key {location!r}{hint}")
        else:
            parts.append(f"{location}: {item['msg']} (got {item.get('input')!r})")
    return UserError(f"{where}: " + "; ".join(parts))


def _valid_keys(model: type[BaseModel] | None, parents: tuple) -> list[str]:
    """Field names of the (nested) model at `parents`, or [] if it cannot be found."""
    for part in parents:
        if model is None:
            return []
        if isinstance(part, int):
            continue
        if part in model.model_fields:
            annotation = model.model_fields[part].annotation
            model = _first_model_in(annotation)
        else:  # a union branch tag such as 'ModelSpec'
            model = _named_model(model, part)
    return sorted(model.model_fields) if model is not None else []


def _first_model_in(annotation) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _first_model_in(arg)
        if found is not None:
            return found
    return None


def _named_model(model: type[BaseModel] | None, name: str) -> type[BaseModel] | None:
    return model if model is not None and model.__name__ == name else None
