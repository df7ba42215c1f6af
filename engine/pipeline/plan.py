"""What a run costs, from its grid alone (`engine plan`): rows, images, UNet evaluations, model
loads, hub ids, and estimated GPU-hours. Nothing is loaded, nothing goes to the network.

Counts follow what the probes do:
- one denoised image per row, times the best-of-N candidates a row chooses among (`candidates()`
  of its params); every image is decoded by the VAE;
- UNet evaluations are per latent: a step with classifier-free guidance (guidance_scale > 1)
  evaluates two (the conditional and unconditional halves of the batch);
- the probes that call the model's own pipeline (standard prompt, interference, inpainting,
  textual inversion's generation) step its own scheduler: PNDM (Stable Diffusion 1.x's) makes
  n + 1 UNet calls for n steps; the probes with their own DDIM loop make n;
- base-model reference images (inpainting context, textual-inversion training data) are made once
  per (concept, prompt, seed, sampler settings) and shared by every erased model;
- textual inversion trains once per (model, concept, settings): max_train_steps x
  gradient_accumulation_steps x train_batch_size UNet passes, each forward and backward;
- a probe that optimises per row (the adversarial prompt) says how many UNet forward + backward
  passes and images a row makes at most (`row_optimisation_passes`, `images_per_row`): an upper
  bound, since a row that stops at its first judged success makes fewer.

GPU-hours use the cost model below, for Stable Diffusion 1.x weights only (built-in toy and tiny
models are far smaller, so they are not costed).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.models.builtin import BUILTIN_MODELS
from engine.models.resolve import HUB_ID
from engine.pipeline.grid import RunGrid
from engine.probe import Probe, get_probe_class
from engine.specs.runs import ModelSpec
from engine.text_table import text_table

# ------------------------------------------------------------------------- the cost model
# FLOP counts of the SD 1.x components at 512 x 512 (64 x 64 latents), counted for this project
# with torch's FlopCounterMode on the diffusers / transformers modules (2 FLOP per multiply-add;
# they agree within 5 % with NVIDIA's and onnx-tool's published counts).
UNET_TFLOP = 0.8033  # one UNet forward pass on one latent
VAE_DECODE_TFLOP = 2.5145  # one latent decoded to a 512 x 512 image
TEXT_ENCODER_TFLOP = 0.0133  # CLIP ViT-L/14 text tower on 77 tokens
NATIVE_PIXELS = 512 * 512
# Backward to the learned input embedding only (the UNet's weights get no gradient): about one more
# forward's worth of work, so a textual-inversion training pass costs about two forward passes.
TRAINING_PASS_FORWARDS = 2.0

# TFLOP/s a GPU actually delivers on that work, from published SD 1.5 fp16 512 px measurements
# converted with the counts above (one UNet step with guidance = 2 x 0.8033 TFLOP).
ENGINE_TFLOPS = {
    # No published batched number: the A100's 25 % of peak (below) applied to the H100's 989 TFLOP/s.
    "h100": 247.0,
    # diffusers' torch 2.0 benchmark table, batch 16, SDPA, no torch.compile: 3.04 steps/s
    # x 16 images x 1.607 TFLOP = 78 TFLOP/s, 25 % of the A100's 312 TFLOP/s peak.
    "a100": 78.1,
    # No published batched number: the A6000's batch-1 rate (below) times the A100's gain from
    # batching (78.1 / 50.1 = 1.56).
    "a6000": 65.9,
}
ORIGINAL_TFLOPS = {
    # One image per pipeline call (the original's way), diffusers with SDPA, no compile.
    # stable-fast's README, vanilla diffusers at batch 1 on an H100: 54.5 steps/s = 87.6 TFLOP/s.
    "h100": 87.6,
    # fal-ai's benchmark, 31.19 steps/s on an A100 = 50.1 TFLOP/s.
    "a100": 50.1,
    # The original's README: about 2 s per 50-step PNDM image on an A6000 (51 guided steps and a
    # decode, 84.5 TFLOP) = 42.3 TFLOP/s.
    "a6000": 42.3,
}
GPUS = tuple(ENGINE_TFLOPS)

PNDM = "PNDMScheduler"
SD1_BUILTINS = frozenset({"sd14-random"})  # built-ins with the full SD 1.x architecture


@dataclass
class Work:
    """Generation work of some rows. `tflop` is None when a model in it is not costed."""

    rows: int = 0
    images: int = 0  # denoised images, every best-of-N candidate included
    unet_evals: int = 0  # UNet forward passes per latent (a guided step counts 2)
    ti_trainings: int = 0  # textual-inversion embeddings trained
    ti_passes: int = 0  # UNet forward + backward passes of that training
    tflop: float | None = 0.0
    row_passes: int = 0  # UNet forward + backward passes of per-row optimisation (upper bound)

    def times(self, n: int) -> Work:
        return Work(self.rows * n, self.images * n, self.unet_evals * n, self.ti_trainings * n, self.ti_passes * n,
                    None if self.tflop is None else self.tflop * n, self.row_passes * n)

    def add(self, other: Work) -> None:
        self.rows += other.rows
        self.images += other.images
        self.unet_evals += other.unet_evals
        self.ti_trainings += other.ti_trainings
        self.ti_passes += other.ti_passes
        self.row_passes += other.row_passes
        self.tflop = None if self.tflop is None or other.tflop is None else self.tflop + other.tflop


@dataclass
class HubModel:
    repo_id: str
    revision: str | None
    cached: bool


@dataclass
class PlanCost:
    grid: RunGrid
    row_counts: dict[str, dict[str, int]]  # model -> probe -> rows
    by_probe: dict[str, Work]
    references: Work  # base-model reference images
    total: Work
    model_loads: int
    hub_models: list[HubModel]
    schedulers: dict[str, tuple[str, bool]]  # model name -> (scheduler class, known rather than assumed)
    notes: list[str] = field(default_factory=list)

    def gpu_hours(self, gpu: str, original: bool = False) -> float | None:
        if self.total.tflop is None:
            return None
        return self.total.tflop / (ORIGINAL_TFLOPS if original else ENGINE_TFLOPS)[gpu] / 3600.0


# ------------------------------------------------------------------------- counting


def estimate(grid: RunGrid) -> PlanCost:
    models = {m.name: m for m in grid.models}
    base = grid.base
    schedulers = {name: scheduler_of(m) for name, m in models.items()}
    if base is not None:
        schedulers.setdefault(base.name, scheduler_of(base))
    row_counts: dict[str, dict[str, int]] = {name: {p.name: 0 for p in grid.probes} for name in models}
    by_probe = {p.name: Work() for p in grid.probes}
    groups: dict[tuple[str, str, str], int] = defaultdict(int)
    concepts_of: dict[tuple[str, str, str], set[str]] = defaultdict(set)  # training: once per (model, concept)
    for row in grid.rows:
        groups[(row.model, row.probe, row.params)] += 1
        concepts_of[(row.model, row.probe, row.params)].add(row.concept)
    probes = {p.name: get_probe_class(p.name)() for p in grid.probes}
    parsed: dict[tuple[str, str], Any] = {}
    for (name, probe, params_json), count in groups.items():
        if (probe, params_json) not in parsed:
            parsed[(probe, params_json)] = probes[probe].params_class.model_validate_json(params_json)
        params = parsed[(probe, params_json)]
        row_counts[name][probe] += count
        work = row_work(probes[probe], params, schedulers[name][0], costed(models[name])).times(count)
        passes = probes[probe].training_passes(params)
        if passes:
            trainings = len(concepts_of[(name, probe, params_json)])
            work.add(training_work(passes, params, costed(models[name])).times(trainings))
        by_probe[probe].add(work)
    references: dict[str, tuple[dict[str, Any], str]] = {}  # reference key -> (settings, concept)
    for row in grid.rows:
        if probes[row.probe].needs_base_reference:
            references.update(reference_images(probes[row.probe], row, parsed[(row.probe, row.params)], grid))
    reference_work = Work()
    for settings, _ in references.values():
        reference_work.add(generation_work(settings, 1, _own_steps(settings["num_inference_steps"], base, schedulers),
                                           base is not None and costed(base)))
    total = Work()
    for work in [*by_probe.values(), reference_work]:
        total.add(work)
    loads = len(models) + (1 if base is not None and base.name not in models else 0)
    hub = hub_models(list(models.values()) + ([base] if base is not None and base.name not in models else []))
    notes = []
    assumed = sorted(name for name, (_, known) in schedulers.items() if not known)
    if assumed:
        notes.append(f"scheduler assumed PNDM (Stable Diffusion 1.x's) for {len(assumed)} model(s) whose config "
                     "is not on this machine")
    uncosted = sorted(name for name, m in models.items() if not costed(m))
    if uncosted:
        notes.append(f"not costed in GPU-hours (not Stable Diffusion 1.x sized): {', '.join(uncosted)}")
    notes.extend(grid.warnings)
    return PlanCost(grid, row_counts, by_probe, reference_work, total, loads, hub, schedulers, notes)


def row_work(probe: Probe, params, scheduler: str, is_costed: bool) -> Work:
    """One row's generation: its candidates, each a full trajectory of the probe's sampler."""
    candidates = len(params.candidates()) if probe.best_of_n else probe.images_per_row(params)
    steps = params.num_inference_steps
    if probe.sampler == "pipeline":
        steps = pndm_calls(steps) if scheduler == PNDM else steps
    work = generation_work(params.model_dump(), candidates, steps, is_costed)
    work.rows = 1
    passes = probe.row_optimisation_passes(params)
    if passes:
        optimisation = training_work(passes, params, is_costed)
        work.row_passes = passes
        work.tflop = None if work.tflop is None or optimisation.tflop is None else work.tflop + optimisation.tflop
    return work


def generation_work(settings: dict[str, Any], images: int, unet_calls: int, is_costed: bool) -> Work:
    guided = settings["guidance_scale"] > 1.0  # diffusers' rule for classifier-free guidance
    latents = images * unet_calls * (2 if guided else 1)
    scale = _pixel_scale(settings)
    tflop = (latents * UNET_TFLOP + images * VAE_DECODE_TFLOP) * scale + images * (2 if guided else 1) * \
        TEXT_ENCODER_TFLOP
    return Work(images=images, unet_evals=latents, tflop=tflop if is_costed else None)


def training_work(passes: int, params, is_costed: bool) -> Work:
    tflop = passes * TRAINING_PASS_FORWARDS * UNET_TFLOP * _pixel_scale(params.model_dump())
    return Work(ti_trainings=1, ti_passes=passes, tflop=tflop if is_costed else None)


def reference_images(probe: Probe, row, params, grid: RunGrid) -> dict[str, tuple[dict[str, Any], str]]:
    """The base-model reference images a row needs, by a key that is equal when they are shared."""
    prompts = probe.base_reference_requests(row, grid.concepts[row.concept], params)
    if not prompts:
        return {}
    settings = {k: getattr(params, k) for k in ("num_inference_steps", "guidance_scale", "negative_prompt",
                                                 "height", "width")}
    return {json.dumps([row.concept, p, s, settings], sort_keys=True): (settings, row.concept) for p, s in prompts}


def pndm_calls(steps: int) -> int:
    """diffusers' PNDM with skip_prk_steps (SD 1.x's config) repeats one timestep: n + 1 calls."""
    return steps + 1


def _own_steps(steps: int, base: ModelSpec | None, schedulers) -> int:
    if base is None:
        return steps
    return pndm_calls(steps) if schedulers[base.name][0] == PNDM else steps


def _pixel_scale(settings: dict[str, Any]) -> float:
    """Convolution and linear work grow with the pixel count (attention somewhat faster)."""
    height, width = settings.get("height"), settings.get("width")
    return (height or 512) * (width or 512) / NATIVE_PIXELS


def costed(model: ModelSpec) -> bool:
    return model.pretrained not in BUILTIN_MODELS or model.pretrained in SD1_BUILTINS


# ------------------------------------------------------------------------- schedulers and the hub cache


def scheduler_of(model: ModelSpec) -> tuple[str, bool]:
    """(scheduler class of the model's pipeline, whether it was read rather than assumed)."""
    source = model.pretrained
    if source in BUILTIN_MODELS:
        return BUILTIN_MODELS[source].scheduler, True
    path = Path(source).expanduser()
    if path.is_dir():
        config = path / "scheduler" / "scheduler_config.json"
        return (_class_name(config), True) if config.is_file() else (PNDM, False)
    if HUB_ID.match(source):
        cached = _cached_file(source, "scheduler/scheduler_config.json", model.revision)
        return (_class_name(Path(cached)), True) if cached else (PNDM, False)
    return PNDM, False


def _class_name(config: Path) -> str:
    try:
        return json.loads(config.read_text()).get("_class_name", PNDM)
    except (OSError, ValueError):
        return PNDM


def _cached_file(repo_id: str, filename: str, revision: str | None) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename, revision=revision)
    return found if isinstance(found, str) and os.path.isfile(found) else None


def hub_models(models: list[ModelSpec]) -> list[HubModel]:
    """Every hub id the models load, and whether its pipeline index is in the local cache."""
    seen: dict[tuple[str, str | None], HubModel] = {}
    for model in models:
        source = model.pretrained
        if source in BUILTIN_MODELS or Path(source).expanduser().exists() or not HUB_ID.match(source):
            continue
        key = (source, model.revision)
        if key not in seen:
            seen[key] = HubModel(source, model.revision, _cached_file(source, "model_index.json", model.revision)
                                 is not None)
    return list(seen.values())


# ------------------------------------------------------------------------- printing


def row_count_lines(grid: RunGrid, counts: dict[str, dict[str, int]] | None = None) -> list[str]:
    """Rows per model x probe, one line per model; consecutive models of one method with the same
    counts (a family's members) share a line."""
    if counts is None:
        counts = {m.name: {p.name: 0 for p in grid.probes} for m in grid.models}
        for row in grid.rows:
            counts[row.model][row.probe] += 1
    probes = list(dict.fromkeys(p.name for p in grid.probes))  # a probe listed with two params sets: one column
    groups: list[list[ModelSpec]] = []
    for model in grid.models:
        previous = groups[-1][-1] if groups else None
        if (previous is not None and previous.method_label == model.method_label and len(model.erased) == 1
                and len(previous.erased) == 1 and counts[previous.name] == counts[model.name]):
            groups[-1].append(model)
        else:
            groups.append([model])
    labels = []
    for group in groups:
        if len(group) == 1:
            labels.append((group[0].name, ", ".join(group[0].erased) or "-"))
        else:
            labels.append((f"{group[0].name} .. {group[-1].name} ({len(group)})", "one each"))
    rows: list[list[object]] = []
    for group, (label, erased) in zip(groups, labels, strict=True):
        values = [counts[group[0].name][p] for p in probes]
        rows.append([label, group[0].method_label, erased, *values, sum(values), "each" if len(group) > 1 else ""])
    headers = ["model", "method", "erased", *probes, "total", ""]
    return text_table(headers, rows, numeric=[False, False, False, *[True] * len(probes), True, False])


def summary_header(grid: RunGrid) -> str:
    roles: defaultdict[str, int] = defaultdict(int)
    for row in grid.rows:
        roles[row.role] += 1
    parts = ", ".join(f"{role} {roles[role]:,d}" for role in ("recovery", "preservation", "base", "unpaired")
                      if roles[role])
    return f"{len(grid.rows):,d} rows ({parts}) for {len(grid.models)} model(s) x {len(grid.probes)} probe(s):"


def plan_lines(cost: PlanCost, gpu: str) -> list[str]:
    grid = cost.grid
    lines = [summary_header(grid), *row_count_lines(grid, cost.row_counts)]
    if grid.skipped_models:
        lines.append(f"  no rows (erased no listed concept): {len(grid.skipped_models)} model(s), "
                     f"{_shorten(grid.skipped_models)}")
    gpu_hours = f"GPU-h {gpu}"
    work_rows: list[list[object]] = [
        [name, work.rows, work.images, work.unet_evals, _hours(work.tflop, ENGINE_TFLOPS[gpu])]
        for name, work in [*cost.by_probe.items(), ("(base references)", cost.references)]
        if name != "(base references)" or work.images
    ]
    total = cost.total
    work_rows.append(["total", total.rows, total.images, total.unet_evals, _hours(total.tflop, ENGINE_TFLOPS[gpu])])
    lines += ["", "work per probe:", *text_table(["probe", "rows", "images", "UNet evals", gpu_hours], work_rows,
                                                 numeric=[False, True, True, True, True])]
    lines.append("  images count every best-of-N candidate; UNet evals count each guided step twice")
    if total.ti_trainings:
        lines.append(f"  textual inversion: {total.ti_trainings:,d} embedding(s) trained, {total.ti_passes:,d} UNet "
                     "forward+backward passes (included above, as 2 forward passes each)")
    if total.row_passes:
        lines.append(f"  per-row optimisation (adversarial prompt): at most {total.row_passes:,d} UNet "
                     "forward+backward passes (included above, as 2 forward passes each); rows that stop at a "
                     "judged success make fewer passes and images")
    lines += ["", f"distinct pipelines: {cost.model_loads} (loads per actor: see models per node below)"]
    cached = sum(h.cached for h in cost.hub_models)
    if cost.hub_models:
        lines.append(f"hub ids: {len(cost.hub_models)} needed, {cached} in the local Hugging Face cache")
        lines.extend(_hub_lines(cost.hub_models))
    else:
        lines.append("hub ids: none (built-in or local models only)")
    lines += ["", f"estimated GPU-hours on one {gpu.upper()} (SD 1.x at 512 px: {UNET_TFLOP * 1000:.1f} GFLOP per "
              f"UNet evaluation, {VAE_DECODE_TFLOP:.2f} TFLOP per decode):"]
    engine_hours, original_hours = cost.gpu_hours(gpu), cost.gpu_hours(gpu, original=True)
    lines.append(f"  this engine (batched fp16, SDPA; {ENGINE_TFLOPS[gpu]:g} TFLOP/s delivered): "
                 f"{_fmt_hours(engine_hours)}")
    lines.append(f"  the original's one image per call ({ORIGINAL_TFLOPS[gpu]:g} TFLOP/s delivered): "
                 f"{_fmt_hours(original_hours)}")
    if cost.notes:
        lines += ["", "notes:", *[f"  {note}" for note in cost.notes]]
    return lines


def _hub_lines(hub: list[HubModel], one_per_line: int = 12) -> list[str]:
    """One line per id for a few; many are grouped by status and organisation, names wrapped."""
    def label(h: HubModel) -> str:
        return f"{h.repo_id}@{h.revision}" if h.revision else h.repo_id

    if len(hub) <= one_per_line:
        return [f"  {'cached ' if h.cached else 'MISSING'}  {label(h)}" for h in hub]
    groups: dict[tuple[bool, str], list[str]] = defaultdict(list)
    for h in hub:
        org, _, name = label(h).partition("/")
        groups[(h.cached, org)].append(name)
    lines = []
    for (is_cached, org), names in sorted(groups.items(), key=lambda item: (item[0][0], item[0][1])):
        lines.append(f"  {'cached ' if is_cached else 'MISSING'}  {org}/ ({len(names)}):")
        line = "    "
        for name in names:
            if len(line) + len(name) > 110:
                lines.append(line.rstrip())
                line = "    "
            line += name + " "
        lines.append(line.rstrip())
    return lines


def _hours(tflop: float | None, tflops: float) -> str:
    return "n/a" if tflop is None else f"{tflop / tflops / 3600:,.1f}"


def _fmt_hours(hours: float | None) -> str:
    if hours is None:
        return "n/a (models not costed, see notes)"
    return f"{hours:,.1f} GPU-hours ({hours / 24:,.1f} GPU-days)"


def _shorten(names: list[str], limit: int = 6) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
