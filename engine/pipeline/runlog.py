"""What a run's actors report to the driver while the stream runs: rows done, failed rows, OOM
splits, units Ray ran again, actor starts and their GPUs.

A plain class, so it is tested without Ray; engine.pipeline.run hosts one instance as a Ray actor
on the driver's node and the stage actors call it. It is a side channel: result rows never pass
through it, so the write path keeps its exactly-once guarantee, and a failed row reaches the driver
here instead of in the stream (it must never land in rows/*.parquet).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from engine.failures import RowFailure


@dataclass
class UnitReport:
    """One unit's outcome, as a probe actor reports it."""

    key: str  # the unit's first row_id: units never share rows
    done: list[str]  # row_ids generated
    failures: list[RowFailure]
    oom_splits: int = 0
    isolation_splits: int = 0
    actor: str = ""  # host:pid of the probe actor
    model_cache: dict | None = None  # its ModelCache's counts so far (CacheStats.record)


@dataclass
class ActorInfo:
    stage: str  # "probe" or "score"
    host: str
    pid: int
    device: str
    gpu: str | None  # torch.cuda.get_device_name, when on a GPU


@dataclass
class RunEvents:
    """Everything the log holds at the end of a run."""

    done: set[str] = field(default_factory=set)
    failures: dict[str, RowFailure] = field(default_factory=dict)  # row_id -> latest failure
    oom_splits: int = 0
    isolation_splits: int = 0
    unit_attempts: Counter = field(default_factory=Counter)
    actors: list[ActorInfo] = field(default_factory=list)
    batch_sizes: list[dict] = field(default_factory=list)  # batch_size auto: each actor's measurement
    model_caches: dict[str, dict] = field(default_factory=dict)  # host:pid -> latest ModelCache counts
    affinity: dict = field(default_factory=dict)  # the UnitScheduler's record (slices, steals, units per actor)

    def model_cache_record(self) -> dict:
        """The manifest's `model_cache`: each probe actor's loads, evictions and peak bytes, and the totals."""
        actors = [{"actor": name, **counts} for name, counts in sorted(self.model_caches.items())]
        return {
            "loads": sum(a.get("loads", 0) for a in actors),
            "evictions": sum(a.get("evictions", 0) for a in actors),
            "peak_bytes_per_actor": max((a.get("peak_bytes", 0) for a in actors), default=0),
            "actors": actors,
            "affinity": self.affinity,
        }

    def failed_rows(self) -> list[RowFailure]:
        # A row that failed in one attempt and succeeded when Ray ran its unit again is done.
        return [f for row_id, f in self.failures.items() if row_id not in self.done]

    def unit_retries(self) -> int:
        """Units Ray ran more than once (after an actor or node was lost)."""
        return sum(n - 1 for n in self.unit_attempts.values() if n > 1)

    def actor_restarts(self, pool_sizes: dict[str, int]) -> int:
        """Actor starts beyond each stage's pool size: restarts after a crash or a lost node."""
        starts = Counter(a.stage for a in self.actors)
        return sum(max(0, starts[stage] - size) for stage, size in pool_sizes.items())

    def gpus(self) -> list[str]:
        return sorted({a.gpu for a in self.actors if a.gpu})

    def fault_counts(self, pool_sizes: dict[str, int]) -> dict[str, int]:
        return {
            "failed_rows": len(self.failed_rows()),
            "oom_splits": self.oom_splits,
            "isolation_splits": self.isolation_splits,
            "unit_retries": self.unit_retries(),
            "actor_restarts": self.actor_restarts(pool_sizes),
        }


class RunLog:
    """The driver-side collector (a Ray actor in a run)."""

    def __init__(self):
        self.events = RunEvents()

    def actor_started(self, info: ActorInfo) -> None:
        self.events.actors.append(info)

    def batch_size_measured(self, record: dict) -> None:
        self.events.batch_sizes.append(record)

    def unit_started(self, key: str) -> None:
        self.events.unit_attempts[key] += 1

    def unit_finished(self, report: UnitReport) -> None:
        self.events.done.update(report.done)
        for failure in report.failures:
            self.events.failures[failure.row.row_id] = failure
        self.events.oom_splits += report.oom_splits
        self.events.isolation_splits += report.isolation_splits
        if report.model_cache is not None:
            self.events.model_caches[report.actor] = report.model_cache

    def progress(self) -> tuple[int, int]:
        """(rows finished, rows of them that failed), each row counted once."""
        failed = sum(1 for row_id in self.events.failures if row_id not in self.events.done)
        return len(self.events.done) + failed, failed

    def snapshot(self) -> RunEvents:
        return self.events
