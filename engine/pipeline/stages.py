"""The stages of a run's stream: typed stage configs, the Ray-free ProbeRunner, and the Ray Data
UDF classes around it (ProbeActor generates, ScoreActor judges with engine.scoring).

A unit is a list of rows sharing (model, probe, params), fixed by the driver. Units cross the Ray
boundary as JSON, encoded and decoded here only (encode_units / decode_unit); in a run the stream
carries tickets and the run's UnitScheduler hands out the units (engine.pipeline.affinity). The
actor keeps a ModelCache: whole pipelines under the `model_memory` byte budget, components with
equal content shared.

Faults inside a unit (ProbeRunner.generate): a CUDA out-of-memory error splits the unit in half
and retries each half, down to one row; any other error splits it the same way to find the row
that fails on its own. A row that fails alone, or whose image is all black (NaN latents decode to
black), becomes a RowFailure instead of a result row. A UserError stops the run as before.

Speed (engine.pipeline.batching, engine.pipeline.encoding): with `batch_size: auto` on a GPU a unit
runs in batches of the size the actor measured; a unit's PNGs encode on a thread pool; an actor
loads its first model in the background while Ray hands it the first unit.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import torch
from pydantic import Field

from engine import __version__
from engine.errors import UserError
from engine.failures import RowFailure
from engine.models.budget import model_memory_bytes
from engine.models.cache import ModelCache
from engine.models.loading import resolve_device
from engine.models.prefetch import Prefetcher, is_cached, is_hub_model, offline
from engine.pipeline.batching import AutoBatcher
from engine.pipeline.encoding import encode_pngs
from engine.pipeline.runlog import ActorInfo, UnitReport
from engine.probe import ProbeBatch, ProbeContext, ProbeOutput, WorkRow, load_probe_class, probe_entry
from engine.results import CANDIDATE_IMAGES, ROW_SCHEMA, STREAM_SCHEMA, rows_table
from engine.scoring.scorer import Scorer
from engine.scoring.selectors import SelectorBank
from engine.specs.base import Frozen
from engine.specs.concepts import ConceptSpec
from engine.specs.judges import JudgeRequest, judge_requests
from engine.specs.runs import ModelSpec
from engine.storage import cache_folder

if TYPE_CHECKING:
    from engine.pipeline.grid import RunGrid

logger = logging.getLogger(__name__)

Device = Literal["auto", "cpu", "cuda"]


# --------------------------------------------------------------------------- stage configs


class ProbeStageConfig(Frozen):
    """Everything a probe actor needs; validated in the driver, pickled to the actors."""

    models: dict[str, ModelSpec] = Field(description="Models by row label (column `model`).")
    base: ModelSpec | None = Field(None, description="The un-erased base model, when a probe needs it.")
    concepts: dict[str, ConceptSpec]
    probes: dict[str, str] = Field(description="Probe name -> registry entry module:Class, as the driver resolved it.")
    device: Device
    attention: Literal["sdpa", "xformers"] = "sdpa"
    torch_threads: int | None = Field(None, ge=1, description="CPU threads; default: all cores.")
    cache_dir: str = Field(description="Folder for probe caches (reference images, embeddings).")
    # The run's judges: the probe actor's selectors reuse them (selector judge / clip).
    judges: list[JudgeRequest] = Field(default_factory=list)
    auto_batch_size: bool = Field(False, description="batch_size auto: on a GPU, units run in measured batches.")
    compile: bool = Field(False, description="torch.compile the UNet.")
    prefetch_model: str | None = Field(None, description="Model to load in the background as the actor starts.")
    model_memory: float | Literal["auto"] = Field("auto", description="The model cache's budget, GB or auto.")

    @classmethod
    def from_grid(
        cls, grid: RunGrid, device: Device, attention: Literal["sdpa", "xformers"], torch_threads: int | None,
        cache_dir: str,
    ) -> ProbeStageConfig:
        return cls(
            models={m.name: m for m in grid.models},
            base=grid.base,
            concepts=dict(grid.concepts),
            probes={p.name: probe_entry(p.name) for p in grid.probes},
            device=device,
            attention=attention,
            torch_threads=torch_threads,
            cache_dir=cache_dir,
            judges=judge_requests(grid.spec.judges),
            auto_batch_size=grid.spec.batch_size == "auto",
            compile=grid.spec.compile,
            model_memory=grid.spec.model_memory,
        )


class ScoreStageConfig(Frozen):
    """What a score actor needs."""

    judges: list[JudgeRequest] = Field(min_length=1)
    concepts: dict[str, ConceptSpec]
    device: Device
    batch_size: int = Field(ge=1)
    torch_threads: int | None = Field(None, ge=1, description="CPU threads; default: 1 (a light stage).")

    @classmethod
    def from_grid(cls, grid: RunGrid, device: Device, torch_threads: int | None) -> ScoreStageConfig:
        return cls(
            judges=judge_requests(grid.spec.judges),
            concepts=dict(grid.concepts),
            device=device,
            batch_size=grid.spec.score_batch_size,
            torch_threads=torch_threads,
        )


# --------------------------------------------------------------------------- the Ray boundary

UNIT_COLUMN = "unit"
TICKET_COLUMN = "ticket"  # model affinity: the stream carries tickets, the run's UnitScheduler the units


def encode_units(units: list[list[WorkRow]]) -> list[dict[str, str]]:
    """Units as Ray Data items: one JSON string each (a plain column, cheap to move)."""
    return [{UNIT_COLUMN: json.dumps([asdict(r) for r in unit])} for unit in units]


def decode_unit(value: Any) -> list[WorkRow]:
    # JSON has no tuples: `erased` comes back a list and becomes the tuple WorkRow holds again.
    return [WorkRow(**{**r, "erased": tuple(r.get("erased", ()))}) for r in json.loads(str(value))]


# --------------------------------------------------------------------------- generation


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def release_memory() -> None:
    """Give freed tensors back before a retry (the failed try's frames are gone by now)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def image_problem(image: np.ndarray) -> str | None:
    """Why a generated image is not a result, or None."""
    if np.issubdtype(image.dtype, np.floating) and not np.isfinite(image).all():
        return "NaN or infinity in the generated image"
    if not image.any():
        return "all-black image (diverged latents decode to black)"
    return None


@dataclass
class UnitOutcome:
    """A unit's result rows, its rows that failed on their own, and how often it was split."""

    records: list[dict[str, Any]] = field(default_factory=list)
    failures: list[RowFailure] = field(default_factory=list)
    oom_splits: int = 0
    isolation_splits: int = 0

    def report(self, key: str, actor: str = "", model_cache: dict | None = None) -> UnitReport:
        return UnitReport(key, [r["row_id"] for r in self.records], self.failures, self.oom_splits,
                          self.isolation_splits, actor, model_cache)


class ProbeRunner:
    """Generates units in-process. Ray-free: the stream's ProbeActor, tune's trials and tests share it."""

    def __init__(self, config: ProbeStageConfig):
        self.config = config
        self.device = resolve_device(config.device)
        if self.device.type == "cpu":
            torch.set_num_threads(config.torch_threads or os.cpu_count() or 1)
        budget = model_memory_bytes(config.model_memory, self.device)
        self.cache = ModelCache(self.device, config.attention, memory_budget=budget, compile=config.compile)
        self.cache_dir = cache_folder(config.cache_dir)  # OUTPUT/cache, or this node's temp folder
        # batch_size auto measures with the model budget's unused part kept free for later loads.
        self.batcher = AutoBatcher(config.auto_batch_size, self.device, reserved_bytes=self.cache.reserved_bytes)
        self.unit_options: dict[str, Any] = {}
        self.probes: dict[str, Any] = {}
        self.selectors = SelectorBank(config.judges, config.concepts, self.device, self.context)
        # With judges, a score stage follows and judges the candidates; without, none would read them.
        self.output_schema = STREAM_SCHEMA if config.judges else ROW_SCHEMA

    def context(self) -> ProbeContext:
        return ProbeContext(
            device=self.device,
            base_pipeline=self._base_pipeline,
            concept=self.config.concepts.__getitem__,
            cache_dir=self.cache_dir,
            options=dict(self.unit_options),
            selector_scores=self.selectors.scores,
            judge_hits=self.selectors.judge_hits,
        )

    def _base_pipeline(self):
        if self.config.base is None:
            raise RuntimeError("this probe needs the base model, but the run did not resolve one")
        return self.cache.pipeline(self.config.base)

    def generate(self, rows: list[WorkRow]) -> UnitOutcome:
        """A unit's result records, with OOM splits and failing rows isolated (see the module doc).
        The probe and the model load first, outside that: failing there is no row's fault."""
        first = rows[0]
        if first.probe not in self.probes:
            self.probes[first.probe] = load_probe_class(self.config.probes[first.probe])()
        pipeline = self.cache.pipeline(self.config.models[first.model])
        outcome = UnitOutcome()
        for rows_of_one_call in self.batcher.split(rows, first.model, pipeline, json.loads(first.params)):
            self._generate_into(rows_of_one_call, outcome)
        return outcome

    def prefetch(self, model: str) -> None:
        """Load `model` in a background thread, so the actor is ready (and handed its first unit)
        while it loads; the first unit waits on the cache's lock. A failure is left to that unit."""

        def load():
            try:
                self.cache.pipeline(self.config.models[model])
            except Exception:
                logger.exception("background load of %s failed", model)

        threading.Thread(target=load, name=f"load-{model}", daemon=True).start()

    def _generate_into(self, rows: list[WorkRow], outcome: UnitOutcome) -> None:
        try:
            output, selector, seconds = self._run_probe(rows)
        except UserError:
            raise
        except Exception as error:  # noqa: BLE001 - any failure of a row is recorded, not fatal
            out_of_memory = is_out_of_memory(error)
            failure = (type(error).__name__, str(error) or repr(error))
            logger.warning("%d row(s) of %s failed (%s: %s)", len(rows), rows[0].probe, *failure)
        else:
            self._collect(rows, output, selector, seconds, outcome)
            return
        # Retried outside the except block, so the failed try's frames (and tensors) are freed.
        release_memory()
        if len(rows) == 1:
            outcome.failures.append(RowFailure.of(rows[0], *failure))
            return
        if out_of_memory:
            outcome.oom_splits += 1
        else:
            outcome.isolation_splits += 1
        half = (len(rows) + 1) // 2
        self._generate_into(rows[:half], outcome)
        self._generate_into(rows[half:], outcome)

    def _run_probe(self, rows: list[WorkRow]) -> tuple[ProbeOutput, list[str | None], float]:
        first = rows[0]
        probe = self.probes[first.probe]
        params = probe.params_class.model_validate_json(first.params)
        # The latent-classifier selector looks where the probe's own classifiers live, if it has any.
        self.unit_options = {"classifier_dir": getattr(params, "classifier_dir", None)}
        pipeline = self.cache.pipeline(self.config.models[first.model])
        started = time.perf_counter()
        self.selectors.take_used()  # forget selectors of an earlier unit that failed midway
        output = probe.run(ProbeBatch(rows=rows, params=params, pipeline=pipeline, context=self.context()))
        seconds = (time.perf_counter() - started) / len(rows)
        # Per row, the selectors the probe called on its concept (with their models); else the one its
        # params name, if any.
        used = self.selectors.take_used()
        selector = [used.get(row.target_concept) or getattr(params, "selector", None) for row in rows]
        if len(output.images) != len(rows):
            raise RuntimeError(f"probe {first.probe} returned {len(output.images)} images for {len(rows)} rows")
        return output, selector, seconds

    def _collect(self, rows, output: ProbeOutput, selectors, seconds: float, outcome: UnitOutcome) -> None:
        pngs = encode_pngs(output.images)
        # ProbeOutput.__post_init__ filled every per-row list.
        assert output.extras is not None and output.scoring_regions is not None and output.candidates is not None
        for row, image, png, extras, region, candidates, row_selector in zip(
            rows, output.images, pngs, output.extras, output.scoring_regions, output.candidates, selectors, strict=False
        ):
            problem = image_problem(image)
            if problem is not None:
                logger.warning("row %s (%s, seed %d) failed: %s", row.row_id, row.prompt, row.seed, problem)
                outcome.failures.append(RowFailure.of(row, "BadImage", problem))
                continue
            outcome.records.append(
                {
                    **row.__dict__,
                    "image": png,
                    "image_width": int(image.shape[1]),
                    "image_height": int(image.shape[0]),
                    "scoring_region": list(region) if region is not None else None,
                    "extras": json.dumps(extras, sort_keys=True, default=float),
                    "generation_seconds": seconds,
                    "device": str(self.device),
                    "engine_version": __version__,
                    "selector": row_selector,
                    "candidate_count": len(candidates) if candidates else None,
                    CANDIDATE_IMAGES: encode_pngs(candidates) if candidates and self.config.judges else None,
                }
            )


def _tell(method, *args) -> None:
    """Call a method of the run's log actor and wait for it (a few ms), so nothing is still in
    flight when the driver reads the log at the end."""
    import ray

    ray.get(method.remote(*args))


def actor_info(stage: str, device: torch.device) -> ActorInfo:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return ActorInfo(stage, socket.gethostname(), os.getpid(), str(device), gpu)


class ProbeActor:
    """Ray Data callable class: a batch of tickets (or of work units) in, a table of result rows out.
    With the run's UnitScheduler a ticket becomes the unit this actor should run next (model
    affinity, engine.pipeline.affinity); the node downloads the models of its coming units ahead
    (engine.models.prefetch). Failed rows and counts go to the run's log (an actor handle), never
    into the stream."""

    def __init__(self, config: ProbeStageConfig, log=None, scheduler=None, keep_downloads: bool = True):
        logging.basicConfig(level=logging.INFO)
        self.runner = ProbeRunner(config)
        self.log = log
        self.scheduler = scheduler
        self.keep_downloads = keep_downloads
        self.actor_id = f"{socket.gethostname()}:{os.getpid()}"
        self.downloads = Prefetcher()
        self.current_model: str | None = None
        if log is not None:
            _tell(log.actor_started, actor_info("probe", self.runner.device))
            self.runner.batcher.on_measured = lambda record: _tell(log.batch_size_measured, record)
        first = config.prefetch_model
        if scheduler is not None:
            import ray

            first = ray.get(scheduler.register.remote(self.actor_id))
        if first in config.models:
            self.runner.prefetch(first)

    def __call__(self, batch: dict[str, Any]) -> pa.Table:
        records = []
        units = batch[UNIT_COLUMN] if UNIT_COLUMN in batch else batch[TICKET_COLUMN]
        for item in units:
            rows = decode_unit(item if UNIT_COLUMN in batch else self._claim(int(item)))
            self._moving_to(rows[0].model)
            if self.log is not None:
                _tell(self.log.unit_started, rows[0].row_id)
            outcome = self.runner.generate(rows)
            if self.log is not None:
                # Before the rows go on: the driver must know of every failure before the run ends.
                _tell(self.log.unit_finished, outcome.report(rows[0].row_id, self.actor_id,
                                                             self.runner.cache.stats.record()))
            records.extend(outcome.records)
        return rows_table(records, self.runner.output_schema)

    def _claim(self, ticket: int) -> str:
        import ray

        unit = ray.get(self.scheduler.claim.remote(ticket, self.actor_id))
        coming = ray.get(self.scheduler.coming_models.remote(self.actor_id))
        self.downloads.want([self.runner.config.models[m] for m in coming if m in self.runner.config.models])
        return unit

    def _moving_to(self, model: str) -> None:
        """A unit of `model` is next: note a download the load will make, and with keep_downloads
        false delete the snapshot of the model left behind once no unit of it is left anywhere."""
        if model == self.current_model:
            return
        previous, self.current_model = self.current_model, model
        spec = self.runner.config.models.get(model)
        if spec is not None and is_hub_model(spec) and not offline() and not is_cached(spec.pretrained, spec.revision):
            self.downloads.downloaded.add((spec.pretrained, spec.revision))  # the load downloads it
        if self.keep_downloads or previous is None or self.scheduler is None:
            return
        import ray

        if ray.get(self.scheduler.model_done.remote(previous)):
            self.downloads.forget(self.runner.config.models[previous])


class ScoreActor:
    """Ray Data callable class: generated rows in, the same rows with judge scores out."""

    def __init__(self, config: ScoreStageConfig, log=None):
        logging.basicConfig(level=logging.INFO)
        device = resolve_device(config.device)
        if device.type == "cpu":
            # A light stage beside the probe actors: few threads, so it never starves generation.
            torch.set_num_threads(config.torch_threads or 1)
        self.scorer = Scorer.from_requests(config.judges, config.concepts, device, config.batch_size)
        self.scorer.prefetch()  # judges load while the probe actors generate the first unit
        if log is not None:
            _tell(log.actor_started, actor_info("score", device))

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.scorer.score_table(batch)
