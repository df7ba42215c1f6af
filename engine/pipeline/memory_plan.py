"""The memory and disk a run's models need, from its grid alone (`engine plan`, and the check
`engine run` makes before it starts). Nothing is loaded; the network is asked only for the sizes of
hub models not downloaded yet (engine.models.footprint), never with HF_HUB_OFFLINE=1.

- Model loads: the run's work units, cut as `engine run` cuts them, handed to the actors by the
  same UnitScheduler (engine.pipeline.affinity) with a unit's time taken as its rows: each change
  of model on an actor is a load. Probes that also use the base model load it beside each model.
- Peak model memory per actor: the actor's sequence of models through an LRU of the model budget
  (`model_memory`; auto = its fraction of the GPU's memory), components shared where their content
  identities are known (files here); a hub model not downloaded counts as sharing nothing.
- Downloads: hub models missing from this machine's cache, by the hub's listing (online) or the
  SD 1.x default; the hub cache's disk must hold them (keep_downloads false: the models of every
  actor's current unit and two ahead).
"""

from __future__ import annotations

import shutil
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import UserError
from engine.models.budget import AUTO_MODEL_MEMORY_FRACTION, GB, format_bytes
from engine.models.footprint import SD1_BUILTINS, ModelFootprint, hub_cache_dir, model_footprint
from engine.pipeline.affinity import UnitScheduler
from engine.pipeline.batching import unit_rows
from engine.pipeline.grid import RunGrid, work_units

GPU_MEMORY_GB = {"h100": 80.0, "a100": 80.0, "a6000": 48.0}
DEFAULT_PLAN_ACTORS = 8  # actors: auto on the plan = one 8-GPU node
DOWNLOADS_AHEAD = 2


@dataclass
class ActorPlan:
    models: list[str] = field(default_factory=list)  # in the order the actor loads them
    loads: int = 0
    peak_bytes: int = 0


@dataclass
class MemoryPlan:
    actors: list[ActorPlan]
    budget_bytes: int
    footprints: dict[str, ModelFootprint]
    largest_need: tuple[str, int]  # the model (with the base beside it, when used) needing the most
    download_bytes: int
    downloads: int
    hub_cache: Path
    free_disk_bytes: int | None
    keep_downloads: bool

    @property
    def loads(self) -> int:
        return sum(a.loads for a in self.actors)

    @property
    def disk_needed(self) -> int:
        if self.keep_downloads or not self.downloads:
            return self.download_bytes
        per_model = self.download_bytes / self.downloads
        return int(per_model * min(self.downloads, len(self.actors) * (1 + DOWNLOADS_AHEAD)))

    @property
    def disk_fits(self) -> bool | None:
        return None if self.free_disk_bytes is None else self.disk_needed <= self.free_disk_bytes


def itemsize_for(device: str) -> int:
    """Bytes a float weight takes where the run loads it: fp32 on CPU, fp16 on a GPU."""
    return 4 if device == "cpu" else 2


def budget_bytes(model_memory: float | str, gpu: str | None) -> int:
    if model_memory != "auto":
        return int(float(model_memory) * GB)
    return int(GPU_MEMORY_GB[gpu or "h100"] * GB * AUTO_MODEL_MEMORY_FRACTION)


def plan_memory(grid: RunGrid, actors: int | None = None, gpu: str | None = "h100",
                online: bool | None = None) -> MemoryPlan:
    spec = grid.spec
    actors = actors or (spec.actors if isinstance(spec.actors, int) else DEFAULT_PLAN_ACTORS)
    itemsize = itemsize_for(spec.device)
    budget = budget_bytes(spec.model_memory, gpu)
    models = {m.name: m for m in grid.models}
    if grid.base is not None:
        models.setdefault(grid.base.name, grid.base)
    footprints = {name: model_footprint(m, itemsize, online) for name, m in models.items()}
    units = work_units(grid.rows, unit_rows(spec.batch_size, spec.device != "cpu"))
    plans = _assign(units, actors, grid)
    base = grid.base.name if grid.base is not None else None
    needs = {}
    for name in footprints:
        with_base = base is not None and name != base and _uses_base(grid, name)
        needs[name] = _bytes_of([name, base] if with_base else [name], footprints)
    for plan in plans:
        plan.peak_bytes = _lru_peak(plan.models, footprints, budget)
    missing = {(f.hub_repo, None): f.download_bytes for f in footprints.values() if f.download_bytes}
    cache = hub_cache_dir()
    return MemoryPlan(plans, budget, footprints, max(needs.items(), key=lambda kv: kv[1], default=("-", 0)),
                      sum(missing.values()), len(missing), cache, free_disk(cache), spec.keep_downloads)


def _uses_base(grid: RunGrid, model: str) -> bool:
    from engine.probe import probe_fact

    probes = {r.probe for r in grid.rows if r.model == model}
    return any(probe_fact(p, "needs_base_reference", False) for p in probes)


def _assign(units, actors: int, grid: RunGrid) -> list[ActorPlan]:
    """Replay the run's scheduler: each free actor (the one with the least work so far) claims next."""
    if not units:
        return [ActorPlan() for _ in range(actors)]
    models = [u[0].model for u in units]
    rows = [len(u) for u in units]
    scheduler = UnitScheduler([str(i) for i in range(len(units))], models, rows, actors)
    names = [f"actor-{a}" for a in range(actors)]
    for name in names:
        scheduler.register(name)
    busy = dict.fromkeys(names, 0.0)
    plans = {name: ActorPlan() for name in names}
    for ticket in range(len(units)):
        actor = min(names, key=lambda n: (busy[n], n))
        index = int(scheduler.claim(ticket, actor))
        busy[actor] += rows[index]
        plan = plans[actor]
        if not plan.models or plan.models[-1] != models[index]:
            plan.models.append(models[index])
    base = grid.base.name if grid.base is not None else None
    for plan in plans.values():
        plan.loads = len(plan.models)
        if base is not None and any(_uses_base(grid, m) for m in plan.models if m != base):
            plan.loads += 1 if base not in plan.models else 0
    return list(plans.values())


def _keys(name: str, footprint: ModelFootprint) -> dict[str, tuple[str, int]]:
    """component -> (sharing key, bytes); a component without a known identity is the model's own."""
    return {c: (footprint.identities.get(c) or f"{name}:{c}", b) for c, b in footprint.memory.items()}


def _bytes_of(names: list[str | None], footprints: dict[str, ModelFootprint]) -> int:
    held: dict[str, int] = {}
    for name in names:
        if name is not None:
            held.update(dict(_keys(name, footprints[name]).values()))
    return sum(held.values())


def _lru_peak(sequence: list[str], footprints: dict[str, ModelFootprint], budget: int) -> int:
    """The most bytes an actor's cache holds walking through `sequence` under `budget`."""
    held: OrderedDict[str, None] = OrderedDict()
    peak = 0
    for name in sequence:
        held[name] = None
        held.move_to_end(name)
        while len(held) > 1 and _bytes_of(list(held), footprints) > budget:
            held.popitem(last=False)
        peak = max(peak, _bytes_of(list(held), footprints))
    return peak


def free_disk(folder: Path) -> int | None:
    """Free bytes on the disk holding `folder` (its nearest existing parent)."""
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            return shutil.disk_usage(candidate).free
    return None


# ------------------------------------------------------------------------- checks and lines


def check_run_fits(grid: RunGrid) -> None:
    """Before a run: a numeric model_memory below what one model needs, or downloads the hub cache's
    disk cannot hold (unless space_check is off), stop it with one line saying what to change."""
    spec = grid.spec
    sized = [m for m in grid.models if m.pretrained not in _small_builtins()]
    if spec.model_memory != "auto" and sized:
        plan = plan_memory(grid, gpu=None)
        name, need = plan.largest_need
        if need > plan.budget_bytes:
            raise UserError(f"model_memory {spec.model_memory:g} GB cannot hold {name} ({format_bytes(need)} at "
                            f"{'fp32' if itemsize_for(spec.device) == 4 else 'fp16'}); set model_memory to at least "
                            f"{need / GB:.2f} or auto")
    if spec.space_check:
        plan = plan_memory(grid, gpu=None if spec.model_memory != "auto" else "h100")
        if plan.disk_fits is False:
            raise UserError(f"the hub cache {plan.hub_cache} has {format_bytes(plan.free_disk_bytes or 0)} free; this "
                            f"run downloads {format_bytes(plan.disk_needed)} ({plan.downloads} model(s)): free space, "
                            "point HF_HUB_CACHE elsewhere, set keep_downloads: false, or pass --no-space-check")


def _small_builtins() -> set[str]:
    from engine.models.builtin import BUILTIN_MODELS

    return set(BUILTIN_MODELS) - SD1_BUILTINS


def memory_lines(plan: MemoryPlan) -> list[str]:
    actors = plan.actors
    peak = max((a.peak_bytes for a in actors), default=0)
    largest_name, largest = plan.largest_need
    lines = ["", f"models per node ({len(actors)} actor(s); on several nodes each holds its own actors' share):",
             f"  model memory per actor: budget {format_bytes(plan.budget_bytes)} (model_memory), peak "
             f"{format_bytes(peak)}; the largest model needs {format_bytes(largest)} ({largest_name})",
             f"  model loads: {plan.loads} in all for {len(plan.footprints)} model(s) (per actor: "
             f"{', '.join(str(a.loads) for a in actors)})"]
    sources = sorted({f.source for f in plan.footprints.values() if f.download_bytes})
    if plan.downloads:
        lines.append(f"  downloads: {format_bytes(plan.download_bytes)} for {plan.downloads} hub model(s) not in the "
                     f"cache ({', '.join(sources)}); disk needed {format_bytes(plan.disk_needed)}"
                     + ("" if plan.keep_downloads else " (keep_downloads: false)"))
    else:
        lines.append("  downloads: none (every model is built in, local or in the hub cache)")
    room = ("unknown" if plan.disk_fits is None else "enough room" if plan.disk_fits else "NOT ENOUGH ROOM")
    lines.append(f"  hub cache {plan.hub_cache}: {format_bytes(plan.free_disk_bytes or 0)} free, {room}")
    return lines
