"""Where each key of a merged config came from, so an error can name the file line or flag."""

from __future__ import annotations


class Sources:
    """Where each key of a merged config came from: a file line, a flag, a `--set`.

    Keys are paths as pydantic reports them, ("probes", 0, "params", "eta_values"). A key's
    label is the one recorded for its longest recorded prefix, else `default`. Recording a key
    again (a flag over the file's value) drops what was recorded beneath it.
    """

    def __init__(self, default: str):
        self.default = default
        self._labels: dict[tuple, str] = {}

    def __str__(self) -> str:
        return self.default

    def __call__(self, loc: tuple) -> str:
        return self.of(loc)

    def record(self, key: tuple | str, label: str) -> None:
        key = (key,) if isinstance(key, str) else tuple(key)
        for recorded in [k for k in self._labels if k[: len(key)] == key]:
            del self._labels[recorded]
        self._labels[key] = label

    def of(self, loc: tuple, deep: bool = False) -> str:
        """The label of `loc`; with deep=True also those of every key recorded beneath it that
        a flag or `--set` changed (a check of a whole entry may be failed by one of its parts)."""
        loc = tuple(loc)
        label = self.default
        for size in range(len(loc), 0, -1):
            if loc[:size] in self._labels:
                label = self._labels[loc[:size]]
                break
        if not deep:
            return label
        beneath = [v for k, v in self._labels.items() if len(k) > len(loc) and k[: len(loc)] == loc]
        extra = [v for v in dict.fromkeys(beneath) if v != label and not v.startswith(self.default)]
        return ", ".join([label, *extra])
