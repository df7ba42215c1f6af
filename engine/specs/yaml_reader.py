"""YAML files read with the line of every key, so errors point at `run.yaml:7`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from engine.errors import UserError
from engine.specs.sources import Sources


def read_yaml(path: Path) -> dict[str, Any]:
    return read_yaml_with_sources(path)[0]


def read_yaml_with_sources(path: Path, label: str | None = None) -> tuple[dict[str, Any], Sources]:
    """A YAML file's top-level mapping, and the line of every key in it (so an error can point at
    `run.yaml:7`). Syntax errors name the file, line and column; a key written twice is an error
    (PyYAML would silently keep the last)."""
    label = label or str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise UserError(f"{label}: is a folder, not a YAML file") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{label}: not a UTF-8 text file (byte {exc.start}: {exc.reason})") from None
    except (OSError, ValueError) as exc:  # permissions, a NUL byte or an over-long name in the path
        raise UserError(f"{label}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None
    loader = None
    try:
        loader = yaml.SafeLoader(text)  # checks every character: may raise a ReaderError already
        node = loader.get_single_node()
        sources = Sources(label)
        if node is not None:
            _record_key_lines(loader, node, (), sources, label, set())
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        raise UserError(yaml_error_line(label, exc, text)) from None
    except RecursionError:  # deeply nested flow collections: the parser recurses per level
        raise UserError(f"{label}: malformed YAML (nested too deeply)") from None
    finally:
        if loader is not None:
            loader.dispose()
    if not isinstance(data, dict):
        raise UserError(f"{label}: expected a mapping of keys at the top level")
    return data, sources


def yaml_error_line(label: str, exc: yaml.YAMLError, text: str) -> str:
    """One line for a YAML error: `FILE:LINE:COLUMN: malformed YAML: PROBLEM (CONTEXT)`, 1-based."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        where = f"{label}:{mark.line + 1}:{mark.column + 1}"
        problem = exc.problem or "invalid syntax"
        if exc.context and exc.context_mark is not None and exc.context_mark.line != mark.line:
            problem += f" ({exc.context} that starts at line {exc.context_mark.line + 1}, " \
                       f"column {exc.context_mark.column + 1})"
        elif exc.context:
            problem += f" ({exc.context})"
        return f"{where}: malformed YAML: {problem}"
    position = getattr(exc, "position", None)
    if isinstance(position, int):  # a ReaderError: an unprintable character
        line = text.count("\n", 0, position) + 1
        column = position - (text.rfind("\n", 0, position) + 1) + 1
        reason = getattr(exc, "reason", None) or "unreadable character"
        return f"{label}:{line}:{column}: malformed YAML: {reason}"
    return f"{label}: malformed YAML: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"


def _record_key_lines(
    loader: yaml.SafeLoader, node, path: tuple, sources: Sources, label: str, seen_nodes: set
) -> None:
    """Walk the node tree: record `label:LINE` for every mapping key and sequence item. An aliased
    node is walked once (aliases of aliases would otherwise make the walk exponential)."""
    if id(node) in seen_nodes:
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue
            key = loader.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise UserError(
                    f"{label}:{line}:{key_node.start_mark.column + 1}: key {key!r} is written twice "
                    f"(first at line {seen[key]}); keep one"
                )
            seen[key] = line
            sources.record((*path, key), f"{label}:{line}")
            _record_key_lines(loader, value_node, (*path, key), sources, label, seen_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            sources.record((*path, index), f"{label}:{item.start_mark.line + 1}")
            _record_key_lines(loader, item, (*path, index), sources, label, seen_nodes)
