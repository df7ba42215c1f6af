"""The package layout's rules, checked on the source: imports point one way (no circle, lazy
imports included), probes build only on the probe API layer, and Ray stays in the pipeline layer."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("engine", "probes", "classifier_training")

# What a probe may import from the project: the probe API, sampling, guidance and the config layer.
PROBE_ALLOWED = (
    "engine.probe",
    "engine.best_of_n",
    "engine.sampling",
    "engine.guidance",
    "engine.concepts",
    "engine.specs.runs",
    "engine.errors",
    "probes.textual_inversion_training",
    "probes",
)
# The two lowest layers: each imports only its own layer and the ones below it.
BASE_LAYER = ("engine.errors", "engine.concepts", "engine.specs.judges", "engine.specs.runs", "engine.metrics.columns",
              "engine.results")
PROBE_API_LAYER = ("engine.probe", "engine.best_of_n", "engine.sampling", "probes.textual_inversion_training",
                   "engine.guidance")
RAY_FREE = ("probes", "engine.scoring", "engine.models", "engine.guidance", "engine.probe", "engine.sampling")


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            modules[name.removesuffix(".__init__")] = path
    return modules


def imported_names(path: Path) -> set[str]:
    """Every module name an import statement in the file names, at any depth (lazy ones too).
    `from package import name` names package.name when that is a module, else the package."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                names.add(submodule if _is_module(submodule) else node.module)
    return names


def _is_module(name: str) -> bool:
    base = ROOT.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    graph = {}
    for module, path in modules.items():
        edges = set()
        for name in imported_names(path):
            while name and name not in modules:
                name = name.rpartition(".")[0]
            # A package's __init__ importing its own submodules is not an arrow upwards.
            if name and name != module and not module.startswith(name + "."):
                edges.add(name)
        graph[module] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in graph[node]:
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_no_import_cycle():
    assert find_cycles(import_graph()) == []


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c"]]


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_probes_import_only_the_probe_api_layer():
    graph = import_graph()
    offending = {
        module: sorted(t for t in targets if not _within(t, PROBE_ALLOWED))
        for module, targets in graph.items()
        if _within(module, ("probes",))
    }
    assert {m: t for m, t in offending.items() if t} == {}


@pytest.mark.parametrize("layer, allowed", [
    (BASE_LAYER, BASE_LAYER),
    (PROBE_API_LAYER, BASE_LAYER + PROBE_API_LAYER),
])  # fmt: skip
def test_low_layers_import_nothing_above_them(layer, allowed):
    graph = import_graph()
    allowed = allowed + ("engine",)  # engine/__init__ holds only the version
    offending = {m: sorted(t for t in targets if not _within(t, allowed)) for m, targets in graph.items()
                 if _within(m, layer)}
    assert {m: t for m, t in offending.items() if t} == {}


@pytest.mark.parametrize("prefix", RAY_FREE)
def test_ray_stays_out_of(prefix):
    modules = project_modules()
    users = [m for m, path in modules.items() if _within(m, (prefix,))
             and any(n == "ray" or n.startswith("ray.") for n in imported_names(path))]
    assert users == []
