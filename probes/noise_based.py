"""Noise-based probe: widen DDIM's stochastic term (eta > 1, noise multiplier v) and keep the best of the sweep.

Every (eta, v) pair is a candidate trajectory of DDIM with sigma = eta * sqrt(var), the direction
term sqrt(|1 - abar_prev - sigma^2|) and the added noise sigma * v * z (engine.sampling.ddim_step);
the original's default sweep is 6 etas x 4 v = 24 candidates per prompt. Deliberate differences
from the original code (docs/deviations.md):
- v is really applied; the original's pipeline silently dropped it, so its 4 "v" variants were only
  4 more random draws;
- every candidate has its own generator, derived from (seed, eta, v), so any candidate can be
  reproduced alone; the original continued one random stream across the sweep. With the default
  `initial_noise: per_candidate` that generator also draws the candidate's starting noise, so the
  candidates of a prompt start from different latents as they did in the original; with `shared`
  all start from the row seed's x_T (the standard probe's), and eta = 0 is then plain DDIM.

One row per prompt: a selector (CLIP by default, never the judge) picks the candidate, and the
row's extras keep the scores of all of them. With `keep_all_candidates` every candidate is its own
row instead (the params of each row then hold a one-candidate sweep).

Control (`control: also` or `only`): every candidate steps with eta 1 and v 1 (plain stochastic DDIM) from
its own generator, so the sweep is 24 ordinary samples chosen the same way: what picking the best
of 24 gives without widened noise.

With `stop: on_hit` (engine.best_of_n_stop) the candidates are made in a coverage-first order, in rounds
of candidate_batch_size, and a prompt stops at its first candidate the run's classifier judge recognises.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, field_validator

from engine.best_of_n import BestOfNParams, BestOfNProbe, unique_values


class NoiseBasedParams(BestOfNParams):
    """Shared generation parameters plus the (eta, v) sweep and how one candidate is chosen."""

    sweep_fields: ClassVar[dict[str, str]] = {"eta": "eta_values", "variance_scale": "variance_scales"}

    eta_values: list[float] = Field(
        [1.0, 1.17, 1.34, 1.51, 1.68, 1.85],
        description="DDIM eta values swept (outer loop); > 1 widens the noise. 0 = deterministic DDIM.",
    )
    variance_scales: list[float] = Field(
        [1.0, 1.02, 1.03, 1.04],
        description="Extra multiplier v of the added noise sigma*v*z, swept for each eta (inner loop).",
    )

    @field_validator("eta_values")
    @classmethod
    def _etas(cls, values: list[float]) -> list[float]:
        return unique_values(values, minimum=0.0)

    @field_validator("variance_scales")
    @classmethod
    def _scales(cls, values: list[float]) -> list[float]:
        return unique_values(values, minimum=0.0, strict=True)

    def candidates(self) -> list[dict[str, float]]:
        """(eta, v) pairs in the original's order: eta outer, v inner."""
        return [{"eta": eta, "variance_scale": v} for eta in self.eta_values for v in self.variance_scales]


class NoiseBasedProbe(BestOfNProbe[NoiseBasedParams]):
    """DDIM with widened noise (eta, v) swept per prompt; a selector keeps one candidate."""

    name = "noise_based"
    params_class = NoiseBasedParams
    smoke_params = {"eta_values": [0.0, 1.5], "variance_scales": [1.0, 1.04], "selector": "clip"}
    base_reference = True

    def step_noise(self, params: NoiseBasedParams, candidate: dict[str, float]) -> tuple[float, float]:
        if params.is_control:  # same candidates and generators, no widened noise
            return 1.0, 1.0
        return candidate["eta"], candidate["variance_scale"]
