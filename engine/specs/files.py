"""Config folders: $ENGINE_CONFIG_DIR, ./configs and the shipped configs, searched by file stem."""

from __future__ import annotations

import importlib
import importlib.resources
import os
from dataclasses import dataclass
from pathlib import Path

SHIPPED = "shipped"


@dataclass(frozen=True)
class ConfigFile:
    """One config file and where it was found: `shipped`, `./configs` or `$ENGINE_CONFIG_DIR <folder>`."""

    path: Path
    source: str


def shipped_config_dir() -> Path | None:
    """The configs the engine ships: the `configs` package's folder, read through importlib.resources,
    so an installed wheel finds them. An editable install made before `configs` became a package does
    not map it; the source tree's folder next to engine/ stands in then."""
    try:
        package = importlib.import_module("configs")
    except ImportError:
        package = None
    if package is not None and getattr(package, "ENGINE_SHIPPED_CONFIGS", False):  # not some other project's `configs`
        folder = Path(str(importlib.resources.files(package)))
        if folder.is_dir():
            return folder
    source_tree = Path(__file__).resolve().parents[2] / "configs"  # engine/specs/files.py
    return source_tree if source_tree.is_dir() else None


def config_sources() -> list[tuple[Path, str]]:
    """(folder, source label) searched for configs, first match wins: $ENGINE_CONFIG_DIR entries,
    ./configs, then the shipped configs. A folder that is the shipped one is labelled `shipped`."""
    env_dirs = [p for p in os.environ.get("ENGINE_CONFIG_DIR", "").split(os.pathsep) if p]
    candidates = [(Path(p), f"$ENGINE_CONFIG_DIR {p}") for p in env_dirs]
    candidates.append((Path.cwd() / "configs", "./configs"))
    shipped = shipped_config_dir()
    if shipped is not None:
        candidates.append((shipped, SHIPPED))
    shipped_key = shipped.resolve() if shipped is not None else None
    unique: dict[Path, tuple[Path, str]] = {}
    for folder, label in candidates:
        if not folder.is_dir() or folder.resolve() in unique:
            continue
        unique[folder.resolve()] = (folder, SHIPPED if folder.resolve() == shipped_key else label)
    return list(unique.values())


def config_dirs() -> list[Path]:
    """Folders searched for configs, first match wins: $ENGINE_CONFIG_DIR entries, ./configs, the shipped ones."""
    return [folder for folder, _ in config_sources()]


def find_config_entries(kind: str) -> dict[str, ConfigFile]:
    """All `<kind>/<stem>.yaml` files with where each came from, keyed by stem (earlier folders shadow later ones)."""
    found: dict[str, ConfigFile] = {}
    for folder, label in reversed(config_sources()):
        for path in sorted((folder / kind).glob("*.yaml")):
            found[path.stem] = ConfigFile(path, label)
    return found


def find_config_files(kind: str) -> dict[str, Path]:
    """All `<kind>/<stem>.yaml` files, keyed by stem (earlier folders shadow later ones)."""
    return {stem: entry.path for stem, entry in find_config_entries(kind).items()}
