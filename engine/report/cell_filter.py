"""`engine report --cells`: which cells get a contact sheet.

A filter is `KEY=PATTERN[,KEY=PATTERN...]` with shell-style patterns (fnmatch): a cell matches when
every key matches; several filters are alternatives. Keys: model, method, concept, target, probe
(the probe's name or its label, e.g. `noise_based[eta=1.5]`), role. `none` writes no cell sheet.
Checked before any row is read, so a typo costs nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from fnmatch import fnmatchcase
from typing import Any

from engine.errors import UserError, did_you_mean

CellFilter = Callable[[dict[str, Any]], bool]

KEYS = {"model": ("model",), "method": ("method",), "concept": ("concept",), "target": ("target_concept",),
        "probe": ("probe", "probe_label"), "role": ("role",)}


def parse_cell_filters(texts: Sequence[str], flag: str = "--cells") -> CellFilter:
    """The cells the filters accept (every cell when there is none)."""
    if not texts:
        return lambda cell: True
    if list(texts) == ["none"]:
        return lambda cell: False
    filters = [_parse_one(text, flag) for text in texts]
    return lambda cell: any(all(_matches(cell, key, pattern) for key, pattern in f) for f in filters)


def _parse_one(text: str, flag: str) -> list[tuple[str, str]]:
    pairs = []
    for part in text.split(","):
        key, sep, pattern = part.partition("=")
        key = key.strip()
        if not sep or not key or not pattern.strip():
            raise UserError(f"{flag} {text}: write KEY=PATTERN[,KEY=PATTERN...] with keys {', '.join(KEYS)} "
                            "(or `none`)")
        if key not in KEYS:
            raise UserError(f"{flag} {text}: unknown key {key!r}{did_you_mean(key, KEYS)}; keys: {', '.join(KEYS)}")
        pairs.append((key, pattern.strip()))
    return pairs


def _matches(cell: dict[str, Any], key: str, pattern: str) -> bool:
    return any(fnmatchcase(str(cell.get(column)), pattern) for column in KEYS[key])
