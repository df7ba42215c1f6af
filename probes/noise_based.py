"""Noise-based probe: widen DDIM's stochastic term (eta > 1, noise multiplier v) and keep the best of the sweep.

Original §3.2 and §2.4: every (eta, v) pair is a candidate trajectory of DDIM with
sigma = eta * sqrt(var), the direction term sqrt(|1 - abar_prev - sigma^2|) and the added noise
sigma * v * z. Two of the original's bugs are fixed (§9.1, §9.20):
- v is really applied (engine.sampling.ddim_step); the original's pipeline silently dropped it;
- every candidate draws its step noise from its own generator, derived from (seed, eta, v), so any
  candidate can be reproduced alone; the original continued one random stream across the sweep.

All candidates start from the row's x_T, drawn from the row's seed exactly as the standard probe
does, so eta = 0 is plain deterministic DDIM and the sweep varies only the trajectory's noise.
Candidates of every row of the batch run together, `candidate_batch_size` at a time.

One row per prompt: a selector (never the judge by default, design §4) picks the candidate, and
the row's extras keep the scores of all of them. With `keep_all_candidates` every candidate is its
own row instead (the params of each row then hold a one-candidate sweep).
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field, field_validator

from engine import sampling
from engine.best_of_n import BestOfNParams, select_per_row, unique_values
from engine.errors import UserError
from engine.probe import Probe, ProbeBatch, ProbeOutput, row_generator


class NoiseBasedParams(BestOfNParams):
    """Shared generation parameters plus the (eta, v) sweep and how one candidate is chosen."""

    eta_values: list[float] = Field(
        [1.0, 1.17, 1.34, 1.51, 1.68, 1.85],
        description="DDIM eta values swept (outer loop); > 1 widens the noise. 0 = deterministic DDIM.",
    )
    variance_scales: list[float] = Field(
        [1.0, 1.02, 1.03, 1.04],
        description="Extra multiplier v of the added noise sigma*v*z, swept for each eta (inner loop).",
    )
    # The names of engine.scoring.selectors.SelectorName, spelled out so probes import no scoring code.
    @field_validator("eta_values")
    @classmethod
    def _etas(cls, values: list[float]) -> list[float]:
        return unique_values(values, minimum=0.0)

    @field_validator("variance_scales")
    @classmethod
    def _scales(cls, values: list[float]) -> list[float]:
        return unique_values(values, minimum=0.0, strict=True)

    def candidates(self) -> list[tuple[float, float]]:
        """(eta, v) pairs in the original's order: eta outer, v inner."""
        return [(eta, v) for eta in self.eta_values for v in self.variance_scales]


class NoiseBasedProbe(Probe):
    name = "noise_based"
    params_class = NoiseBasedParams

    def expand_params(self, params: NoiseBasedParams) -> list[NoiseBasedParams]:
        if not params.keep_all_candidates:
            return [params]
        # One row per candidate. Nothing is selected among one candidate, so the selector is 'none'
        # and does not enter the row's identity; expanding twice changes nothing.
        base = params.model_dump()
        return [
            NoiseBasedParams.model_validate({**base, "eta_values": [eta], "variance_scales": [v], "selector": "none"})
            for eta, v in params.candidates()
        ]

    @torch.no_grad()
    def run(self, batch: ProbeBatch) -> ProbeOutput:
        params: NoiseBasedParams = batch.params
        pipe = batch.pipeline
        candidates = params.candidates()
        if params.keep_all_candidates and len(candidates) != 1:
            raise ValueError("keep_all_candidates rows hold one candidate each; expand the params first")
        if not params.keep_all_candidates and batch.context.selector_scores is None:
            raise UserError(f"selector {params.selector!r} is not available in this run (no scoring context)")

        # 1. Every (row, candidate) pair, eta outer and v inner, rows one after another.
        work = [(row, eta, v) for row in batch.rows for eta, v in candidates]
        schedule = sampling.DDIMSchedule.from_pipeline(pipe, params.num_inference_steps)

        # 2. Denoise the candidates in chunks: x_T from the row's seed (as the standard probe), step
        #    noise from the candidate's own generator (seed, eta, v).
        images: list[np.ndarray] = []
        for start in range(0, len(work), params.candidate_batch_size):
            chunk = work[start : start + params.candidate_batch_size]
            embeddings = sampling.encode_prompts(
                pipe, [row.prompt for row, _, _ in chunk], params.negative_prompt, params.guidance_scale
            )
            latents = sampling.initial_latents(
                pipe, [row_generator(row.seed) for row, _, _ in chunk], params.height, params.width
            )
            latents = sampling.denoise(
                pipe,
                latents,
                embeddings,
                schedule,
                params.guidance_scale,
                eta=torch.tensor([eta for _, eta, _ in chunk]),
                variance_scale=torch.tensor([v for _, _, v in chunk]),
                generators=[row_generator(row.seed, eta, v) for row, eta, v in chunk],
            )
            # 3. Decode this chunk; only uint8 images stay in memory.
            images.extend(sampling.decode(pipe, latents))

        # 4. Keep-all rows are their single candidate; otherwise the selector's argmax per row,
        #    with every candidate handed over for the "mean over all candidates" report (design §4).
        per_row = len(candidates)
        if params.keep_all_candidates:
            extras = [{"eta": candidates[0][0], "variance_scale": candidates[0][1]} for _ in batch.rows]
            return ProbeOutput(images=images, extras=extras)
        out_images, extras, row_candidates = [], [], []
        for _, row_images, chosen, scores in select_per_row(batch, params.selector, images, per_row):
            out_images.append(row_images[chosen])
            row_candidates.append(row_images)
            extras.append(
                {
                    "selected_candidate": chosen,
                    "eta": candidates[chosen][0],
                    "variance_scale": candidates[chosen][1],
                    "selector": params.selector,
                    "selector_score": scores[chosen],
                    "candidate_scores": scores,
                }
            )
        return ProbeOutput(images=out_images, extras=extras, candidates=row_candidates)
