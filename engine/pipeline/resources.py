"""How a run's stages share the cluster: actors, GPU fractions and devices. Pure, so it is tested
on made-up clusters (no GPU, one, four) without Ray."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from engine.errors import UserError
from engine.specs.judges import judge_requests
from engine.specs.runs import RunSpec

# Scoring shares the GPUs: by default a probe actor takes 0.9 of one and a score actor 0.1.
DEFAULT_SCORE_GPU_SHARE = 0.1


@dataclass(frozen=True)
class StageResources:
    probe_actors: int
    gpus_per_probe_actor: float
    probe_device: Literal["cpu", "cuda"]
    score_actors: int  # 0: the run has no judges, so no score stage
    gpus_per_score_actor: float
    score_device: Literal["cpu", "cuda"]

    def gpus_wanted(self) -> float:
        return self.probe_actors * self.gpus_per_probe_actor + self.score_actors * self.gpus_per_score_actor

    def pool_sizes(self) -> dict[str, int]:
        return {"probe": self.probe_actors, "score": self.score_actors}


def plan_resources(cluster_gpus: float, spec: RunSpec, units: int) -> StageResources:
    """The stages' resources for `units` work units on a cluster with `cluster_gpus` GPUs.
    Raises UserError when the request cannot fit (it would wait for GPUs forever)."""
    scoring = bool(judge_requests(spec.judges))
    # device: cpu keeps every stage off the GPUs, even on a cluster that has some.
    gpus_usable = cluster_gpus if spec.device != "cpu" else 0.0
    if not scoring:
        score_gpus = 0.0
    elif spec.score_gpus == "auto":
        score_gpus = DEFAULT_SCORE_GPU_SHARE if gpus_usable else 0.0
    else:
        score_gpus = float(spec.score_gpus)
    if spec.gpus_per_actor == "auto":
        probe_gpus = 1.0 - score_gpus if gpus_usable else 0.0
    else:
        probe_gpus = float(spec.gpus_per_actor)
    actors = max(1, int(gpus_usable)) if spec.actors == "auto" else spec.actors
    resources = StageResources(
        probe_actors=max(1, min(actors, units)),
        gpus_per_probe_actor=probe_gpus,
        probe_device=spec.device if spec.device != "auto" else ("cuda" if probe_gpus > 0 else "cpu"),
        score_actors=spec.score_actors if scoring else 0,
        gpus_per_score_actor=score_gpus,
        score_device="cuda" if score_gpus > 0 else "cpu",
    )
    wanted = resources.gpus_wanted()
    if wanted > cluster_gpus + 1e-6:
        have = f"the cluster has {cluster_gpus:g}" if cluster_gpus else "the cluster has none"
        raise UserError(
            f"{resources.probe_actors} probe actor(s) x {probe_gpus:g} GPU + {resources.score_actors} score actor(s) "
            f"x {score_gpus:g} GPU need {wanted:g} GPUs; {have}. Lower gpus_per_actor, actors or score_gpus"
        )
    return resources
