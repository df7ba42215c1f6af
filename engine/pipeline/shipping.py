"""Send the engine's code to a cluster's workers, and say which engine each worker node runs.

Worker nodes of a real cluster run their own Python: without this engine installed there (or an
older one), a ProbeActor cannot even be unpickled. Ray's answer is the runtime_env's `py_modules`:
the driver zips each package folder, uploads it to the cluster once (content-hashed), and every
worker of the job imports it from its node's runtime-resources folder ahead of anything installed.
The toy-world weights (~15 MB) travel only when a run uses a toy model or the toy judge. Ray also
puts the driver's working folder first on every worker's sys.path: on the driver's own machine, a
source checkout the driver was started from is imported instead of the shipped copy (same code).

Before work starts, one tiny task per node reports the engine version and module files that node
imports; a node whose version differs from the driver's, or that has no engine, gets one warning line.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SHIPPED_PACKAGES = ("engine", "probes", "classifier_training", "configs")
# Patterns relative to each shipped folder (gitignore syntax, as Ray's `excludes` reads them).
ALWAYS_EXCLUDED = ["__pycache__/", "*.pyc", "*.egg-info/"]
TOY_WEIGHTS_PATTERN = "toyworld/weights/"
TOY_JUDGE = "toy"
VERSION_CHECK_TIMEOUT_S = 180.0  # the first task on a node also unpacks the shipped code there


def should_ship(cluster: str | None, ship_code: bool | None) -> bool:
    """--ship-code/--no-ship-code win; by default ship to an existing cluster, never to the local
    Ray the engine starts itself (its workers run this very interpreter)."""
    return ship_code if ship_code is not None else cluster is not None


def uses_toy_weights(grid: Any) -> bool:
    """Whether a run grid (engine.pipeline.grid.RunGrid) loads the shipped toy-world weights: a toy
    model as probed or base model, a folder inside the weights, or the toy judge."""
    from engine.specs.judges import judge_requests
    from engine.toyworld import __file__ as toyworld_init

    weights = (Path(toyworld_init).resolve().parent / "weights").as_posix()
    models = [*grid.models, *([grid.base] if grid.base is not None else [])]
    for model in models:
        ref = str(model.pretrained)
        if ref.startswith("toy-") or ref.startswith(weights):
            return True
    return any(request.name == TOY_JUDGE for request in judge_requests(grid.spec.judges))


def package_folder(name: str) -> Path:
    """The folder a shipped package is imported from on the driver."""
    if name == "configs":
        # An editable install made before configs/ became a package does not map it (engine.specs.files).
        from engine.specs.files import shipped_config_dir

        folder = shipped_config_dir()
        if folder is None:
            raise RuntimeError("the engine's shipped configs folder is missing; reinstall the engine")
        return folder
    module = importlib.import_module(name)
    paths = list(getattr(module, "__path__", []))
    if len(paths) != 1:
        raise RuntimeError(f"cannot ship package {name!r}: it is spread over {len(paths)} folders ({paths})")
    return Path(paths[0])


def code_runtime_env(toy_weights: bool) -> dict[str, Any]:
    """runtime_env entries that ship the engine's packages to every worker of the job."""
    excludes = list(ALWAYS_EXCLUDED)
    if not toy_weights:
        excludes.append(TOY_WEIGHTS_PATTERN)
    return {"py_modules": [str(package_folder(name)) for name in SHIPPED_PACKAGES], "excludes": excludes}


# --------------------------------------------------------------------------- version check


@dataclass(frozen=True)
class NodeEngine:
    node: str
    version: str | None  # None: the node cannot import the engine
    engine_file: str | None
    probes_file: str | None
    error: str | None = None


def origin_reporter() -> Callable[[], dict[str, Any]]:
    """The function the check runs on each node. It is made inside this function so cloudpickle
    sends it by value: a node without the engine can still run it and say so."""

    def engine_origin() -> dict[str, Any]:
        import importlib as _importlib

        try:
            engine = _importlib.import_module("engine")
            probes = _importlib.import_module("probes")
        except ImportError as error:
            failure = f"{type(error).__name__}: {error}"
            return {"version": None, "engine_file": None, "probes_file": None, "error": failure}
        return {"version": getattr(engine, "__version__", "unknown"), "engine_file": engine.__file__,
                "probes_file": probes.__file__, "error": None}

    return engine_origin


def node_engines(ray, timeout_s: float = VERSION_CHECK_TIMEOUT_S) -> list[NodeEngine]:
    """One zero-CPU task pinned to each alive node, under the job's runtime_env (so it imports what
    that node's probe actors import). A node that does not answer within `timeout_s` is reported so."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    remote = ray.remote(num_cpus=0, max_retries=0)(origin_reporter())
    futures = {}
    for node in ray.nodes():
        if node.get("Alive"):
            label = node.get("NodeManagerAddress") or node["NodeID"][:12]
            label = label if label not in futures else f"{label} ({node['NodeID'][:8]})"  # nodes sharing an IP
            strategy = NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
            futures[label] = remote.options(scheduling_strategy=strategy).remote()
    ready, _ = ray.wait(list(futures.values()), num_returns=len(futures), timeout=timeout_s)
    reports = []
    for label, future in futures.items():
        if future in ready:
            try:
                answer = ray.get(future)
            except Exception as error:  # noqa: BLE001 (the node died, or could not set up the runtime_env)
                first_line = (str(error).splitlines() or [""])[0]
                answer = {"version": None, "engine_file": None, "probes_file": None,
                          "error": f"{type(error).__name__} {first_line}".strip()}
        else:
            ray.cancel(future, force=True)
            answer = {"version": None, "engine_file": None, "probes_file": None,
                      "error": f"no answer within {timeout_s:g} s"}
        reports.append(NodeEngine(label, **answer))
    return reports


def mismatch_lines(driver_version: str, reports: list[NodeEngine], shipped: bool) -> list[str]:
    """One line per node whose engine is not the driver's version."""
    hint = "" if shipped else "; --ship-code sends the driver's"
    lines = []
    for report in reports:
        if report.version is None:
            lines.append(f"worker node {report.node} cannot import the engine ({report.error}){hint}")
        elif report.version != driver_version:
            lines.append(f"worker node {report.node} runs engine {report.version} from {report.engine_file}; "
                         f"the driver runs {driver_version}{hint}")
    return lines


def report_node_engines(ray, shipped: bool) -> list[NodeEngine]:
    """Log where each node imports the engine from (INFO) and every version mismatch (WARNING)."""
    import engine

    reports = node_engines(ray)
    for report in reports:
        logger.info("worker node %s imports engine %s from %s and probes from %s", report.node, report.version,
                    report.engine_file, report.probes_file)
    for line in mismatch_lines(engine.__version__, reports, shipped):
        logger.warning(line)
    return reports
