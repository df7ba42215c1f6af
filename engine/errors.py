"""User-facing errors: short, specific, raised before any expensive work."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable
from typing import Any

from pydantic import BaseModel


class UserError(Exception):
    """Bad input from the user. The CLI prints the message on one line and exits with code 2."""


def unknown_choice(kind: str, value: str, choices: Iterable[str]) -> UserError:
    choices = sorted(choices)
    valid = ", ".join(choices) or "(none)"
    return UserError(f"unknown {kind} {value!r}{did_you_mean(value, choices)}; valid choices: {valid}")


def did_you_mean(value: object, choices: Iterable[str]) -> str:
    """` (did you mean 'church'?)` for the closest choices to a misspelt name, or nothing."""
    if not isinstance(value, str):
        return ""
    close = difflib.get_close_matches(value, list(choices), n=2, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


def format_validation_error(
    error, where: str | Callable[[tuple], str], model: type[BaseModel] | None = None
) -> UserError:
    """Turn a pydantic ValidationError into one line that names the bad key and value.

    `where` names the source: a string, or a function of an error's location (engine.specs.sources.Sources)
    when the values were merged from a file, flags and `--set`, so each bad value is blamed on the
    place it was written. Unknown keys are the most common mistake (a misspelling), so when there
    are any, only they are reported, with the keys that would have been valid.
    """
    # The tag of a discriminated union is not a key the user wrote: tags are written `<kind>`.
    items = [{**item, "loc": tuple(p for p in item["loc"] if not (isinstance(p, str) and p.startswith("<")))}
             for item in error.errors()]
    unknown = [i for i in items if i["type"] == "extra_forbidden"]
    by_source: dict[str, list[str]] = {}
    for item in unknown or _merge_union_branches(items):
        location = ".".join(str(p) for p in item["loc"]) or "(top level)"
        whole_entry = isinstance(item.get("input"), dict) and item["type"] == "value_error"
        if item["type"] == "extra_forbidden":
            valid = _valid_keys(model, item["loc"][:-1])
            hint = f"; valid keys: {', '.join(valid)}" if valid else ""
            part = f"unknown key {location!r}{did_you_mean(item['loc'][-1], valid)}{hint}"
        elif item["type"] == "missing":
            part = f"{location}: {item['msg']}"
        else:
            # A validator's ValueError is already written for the user: no "Value error, " before it.
            message = item["msg"].removeprefix("Value error, ")
            got = "" if whole_entry else f" (got {_short_repr(item.get('input'))})"
            part = f"{location}: {message}{got}"
        loc = tuple(item["loc"])
        if not callable(where):
            source = where
        elif whole_entry and hasattr(where, "of"):  # a check of a whole entry may fail on any of its parts
            source = where.of(loc, deep=True)
        else:
            source = where(loc)
        by_source.setdefault(source, []).append(part)
    return UserError("; ".join(f"{source}: " + "; ".join(parts) for source, parts in by_source.items()))


# How pydantic names the branch of a union in an error's location: float, int, literal['auto'], ...
_UNION_BRANCH = re.compile(r"^(float|int|str|bool|none|bytes|literal\[.*\]|list\[.*\]|dict\[.*\]|function-\w+\[.*\])$")


def _merge_union_branches(items: list[dict]) -> list[dict]:
    """One error per value that matched no branch of a union (`float | Literal['auto']`): pydantic
    reports one per branch, at `key.float` and `key.literal['auto']`; this reads
    `key: Input should be a finite number, or 'auto'`."""
    merged: list[dict] = []
    groups: dict[tuple, dict] = {}
    for item in items:
        loc = tuple(item["loc"])
        if loc and isinstance(loc[-1], str) and _UNION_BRANCH.match(loc[-1]):
            key = loc[:-1]
            if key in groups:
                group = groups[key]
                message = item["msg"].removeprefix("Input should be ")
                group["msg"] = f"{group['msg']}, or {message}"
                continue
            groups[key] = {**item, "loc": key}
            merged.append(groups[key])
        else:
            merged.append(item)
    return merged


def _short_repr(value: Any, limit: int = 80) -> str:
    """repr on one line, cut to `limit` characters: the input may be a whole mapping or a huge string."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
