"""Score a table of result rows with a set of judges: the Ray-free core of ScoreActor and `engine score`.

Each row's image is cropped to its `scoring_region` and judged against its `target_concept` (for
most probes the concept itself; for interference, the other concept shown). Rows of best-of-N
probes may carry the transient column `candidate_images` (PNG bytes of every candidate); each
candidate is judged the same way and reduced to per-row means (`candidate_clip_mean`,
`candidate_top1_rate`, `candidate_top5_rate`) and to the list of every candidate's hit
(`candidate_hits`, the classifier judge's top-1 rule), then the column is dropped.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from engine.metrics.columns import CANDIDATE_HITS, HIT_METRIC, TOP5_CLASSES, TOP5_PROBS, metric
from engine.results import CANDIDATE_IMAGES, ROW_SCHEMA, decode_png
from engine.scoring.judge import CANDIDATE_COLUMNS, MODEL_COLUMN, Judge
from engine.scoring.registry import JudgeRequest, build_judge
from engine.specs.concepts import ConceptSpec

logger = logging.getLogger(__name__)


def crop_to_region(image: np.ndarray, region: list[int] | tuple[int, ...] | None) -> np.ndarray:
    """The part of `image` that counts: [left, top, right, bottom] pixels, clipped to the image."""
    if region is None:
        return image
    left, top, right, bottom = (int(v) for v in region)
    height, width = image.shape[:2]
    left, right = max(0, left), min(width, right)
    top, bottom = max(0, top), min(height, bottom)
    if right <= left or bottom <= top:
        raise ValueError(f"scoring region {list(region)} is empty on a {width}x{height} image")
    return np.ascontiguousarray(image[top:bottom, left:right])


def _mean(values: list[Any]) -> float | None:
    present = [float(v) for v in values if v is not None]
    return sum(present) / len(present) if present else None


class Scorer:
    """Judges rows in chunks of `batch_size` images; one judge per score slot."""

    def __init__(self, judges: list[Judge], concepts: dict[str, ConceptSpec], batch_size: int = 32):
        self.judges = judges
        self.concepts = concepts
        self.batch_size = batch_size

    @classmethod
    def from_requests(
        cls, requests: list[JudgeRequest], concepts: dict[str, ConceptSpec], device: torch.device, batch_size: int
    ) -> Scorer:
        return cls([build_judge(r, device) for r in requests], concepts, batch_size)

    def prefetch(self) -> threading.Thread:
        """Load every judge in a background thread, so the weights load while the first images are
        generated. A failure is only logged here: the first score call loads again and raises it."""

        def load():
            for judge in self.judges:
                try:
                    judge.ensure_loaded()
                except Exception:
                    logger.exception("background load of judge %s failed", judge.name)

        thread = threading.Thread(target=load, name="load-judges", daemon=True)
        thread.start()
        return thread

    def _concept(self, name: str) -> ConceptSpec:
        if name not in self.concepts:
            raise KeyError(f"row concept {name!r} is not among the scorer's concepts ({', '.join(self.concepts)})")
        return self.concepts[name]

    def _judge_in_chunks(self, judge: Judge, images: list[np.ndarray], concepts: list[ConceptSpec]):
        columns: dict[str, list[Any]] = {}
        for start in range(0, len(images), self.batch_size):
            chunk = judge.score(images[start : start + self.batch_size], concepts[start : start + self.batch_size])
            for name, values in chunk.items():
                columns.setdefault(name, []).extend(values)
        return columns

    def _candidate_means(self, judge: Judge, rows: list[dict[str, Any]], concepts: list[ConceptSpec]):
        """Per row, the mean of each candidate-reduced column over all its candidates (None without),
        and, for the judge whose slot holds the hit metric, every candidate's hit in order."""
        reductions = CANDIDATE_COLUMNS[judge.slot]
        with_hits = metric(HIT_METRIC).slot == judge.slot
        means: dict[str, list[Any]] = {name: [] for name in [*reductions, *([CANDIDATE_HITS] if with_hits else [])]}
        for row, concept in zip(rows, concepts, strict=False):
            encoded = row.get(CANDIDATE_IMAGES) or []
            if not encoded:
                for values in means.values():
                    values.append(None)
                continue
            images = [crop_to_region(decode_png(data), row["scoring_region"]) for data in encoded]
            scored = self._judge_in_chunks(judge, images, [concept] * len(images))
            for name, source in reductions.items():
                means[name].append(_mean(scored[source]))
            if with_hits:  # a style has no classes: null, never a list of False
                hits = scored[HIT_METRIC]
                means[CANDIDATE_HITS].append(None if any(h is None for h in hits) else [bool(h) for h in hits])
        return means

    def score_table(self, table: pa.Table) -> pa.Table:
        """Rows in (ROW_SCHEMA columns, maybe candidate_images) -> ROW_SCHEMA rows with this scorer's
        slots filled. Other columns pass through unchanged."""
        started = time.perf_counter()
        wanted = ["image", "scoring_region", "target_concept"]
        has_candidates = CANDIDATE_IMAGES in table.column_names
        rows = table.select(wanted + ([CANDIDATE_IMAGES] if has_candidates else [])).to_pylist()
        images = [crop_to_region(decode_png(r["image"]), r["scoring_region"]) for r in rows]
        concepts = [self._concept(r["target_concept"]) for r in rows]
        updates: dict[str, list[Any]] = {}
        for judge in self.judges:
            updates.update(self._judge_in_chunks(judge, images, concepts))
            updates[MODEL_COLUMN[judge.slot]] = [judge.model_id] * len(rows)
            if has_candidates:
                updates.update(self._candidate_means(judge, rows, concepts))
            else:
                # Candidate images are not stored, so a rescore cannot recompute these means; old
                # values from another judge would be mislabelled, so they are cleared.
                counts = table.column("candidate_count").to_pylist() if "candidate_count" in table.column_names else []
                if any(counts):
                    logger.warning("candidate means and hits for %s cleared: candidate images are not stored",
                                   judge.name)
                cleared = [*CANDIDATE_COLUMNS[judge.slot], *([CANDIDATE_HITS] if metric(HIT_METRIC).slot == judge.slot
                                                             else [])]
                for name in cleared:
                    updates[name] = [None] * len(rows)
        self._clip_top5(table, images, concepts, updates)
        if self.judges:
            seconds = (time.perf_counter() - started) / max(1, len(rows))
            updates["scoring_seconds"] = [seconds] * len(rows)
        return conform(table, updates)


    def _clip_top5(self, table: pa.Table, images, concepts, updates: dict[str, list[Any]]) -> None:
        """Without a classifier judge, the CLIP judge names what each image shows: its top 5 among the
        concept set's members. Rows a classifier judge ranked (earlier, kept by a rescore) keep its ranking."""
        if any(judge.slot == "classifier" for judge in self.judges):
            return
        clip = next((judge for judge in self.judges if judge.slot == "clip"), None)
        if clip is None or not hasattr(clip, "member_rankings"):
            return
        ranked_by_classifier = (table.column(MODEL_COLUMN["classifier"]).to_pylist()
                                if MODEL_COLUMN["classifier"] in table.column_names else [None] * len(images))
        wanted = [i for i, model in enumerate(ranked_by_classifier) if model is None]
        rankings = []
        for start in range(0, len(wanted), self.batch_size):
            chunk = wanted[start : start + self.batch_size]
            rankings += clip.member_rankings([images[i] for i in chunk], [concepts[i] for i in chunk])
        kept = {name: (table.column(name).to_pylist() if name in table.column_names else [None] * len(images))
                for name in (TOP5_CLASSES, TOP5_PROBS)}
        for index, (classes, probs) in zip(wanted, rankings, strict=True):
            kept[TOP5_CLASSES][index], kept[TOP5_PROBS][index] = classes, probs
        updates.update(kept)


def conform(table: pa.Table, updates: dict[str, list[Any]]) -> pa.Table:
    """ROW_SCHEMA table: `updates` replace columns, other schema columns pass through (or null)."""
    columns = []
    for field in ROW_SCHEMA:
        if field.name in updates:
            columns.append(pa.array(updates[field.name], type=field.type))
        elif field.name in table.column_names:
            columns.append(table.column(field.name).cast(field.type))
        else:
            columns.append(pa.nulls(table.num_rows, type=field.type))
    return pa.Table.from_arrays(columns, schema=ROW_SCHEMA)
