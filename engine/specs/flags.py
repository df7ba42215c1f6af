"""Command-line values written as `OWNER.KEY=VALUE` (--probe-param, --judge-option)."""

from __future__ import annotations

from typing import Any

from engine.errors import UserError


def parse_owner_key_values(items: list[str], flag: str, owner: str) -> dict[str, dict[str, Any]]:
    """`OWNER.KEY=VALUE` flags (--probe-param, --judge-option) -> {owner: {key: value}}. Values are
    read as YAML, as in run files, so `2`, `[1, 2]` and `true` keep their types."""
    import yaml

    parsed: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        name, dot, field = key.partition(".")
        if not sep or not dot or not name or not field:
            raise UserError(f"{flag} expects {owner}.KEY=VALUE, got {item!r}")
        try:
            parsed.setdefault(name, {})[field] = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise UserError(f"{flag} {key}: cannot parse value {raw!r}") from None
    return parsed
