"""Diffusion completion probe: the base model starts the trajectory, the erased model finishes it.

The original notebook's algorithm (the original's src code restarted a full schedule from the
hand-over latent instead: docs/deviations.md). With deterministic DDIM (eta = 0) on one schedule of N steps:
1. x_T from the row's seed, on the CPU, as the standard probe draws it;
2. the base model runs steps 0..k (k+1 steps) and stops at timestep timesteps[k+1];
3. the erased model continues from that latent at timesteps[k+1] and runs the remaining N-k-1 steps;
4. the erased pipeline's VAE decodes the final latents.

Each hand-over step k is its own row (expand_params), not a best-of-N candidate: k is an axis of
the analysis ("how late can the erased model still steer away?"), so every k is reported. k = -1
hands over before any base step (the erased model's own DDIM image); k = N-1 hands over after the
last step (the base model's DDIM image). Both are controls.
"""

from __future__ import annotations

import torch
from pydantic import Field, field_validator, model_validator

from engine import sampling
from engine.probe import Probe, ProbeBatch, ProbeOutput, ProbeParams, row_generator

ERASED_ONLY = -1  # k = -1: no base step, the erased model runs the whole schedule


class DiffusionCompletionParams(ProbeParams):
    """Shared generation parameters plus the hand-over points."""

    handover_steps: list[int] = Field(
        [0, 1, 2],
        description="k values: the base model runs k+1 DDIM steps, the erased model the rest; one row per k. "
        "The notebook's grid: [1, 2, 3, 5, 10, 15, 20]. -1 = erased model only; num_inference_steps-1 = base only.",
    )

    @field_validator("handover_steps")
    @classmethod
    def _non_empty_unique(cls, values: list[int]) -> list[int]:
        if not values:
            raise ValueError("give at least one hand-over step")
        if len(set(values)) != len(values):
            raise ValueError(f"hand-over steps listed more than once: {values}")
        return values

    @model_validator(mode="after")
    def _within_schedule(self) -> DiffusionCompletionParams:
        bad = [k for k in self.handover_steps if not ERASED_ONLY <= k < self.num_inference_steps]
        if bad:
            raise ValueError(
                f"hand-over steps {bad} outside [-1, {self.num_inference_steps - 1}] "
                f"for num_inference_steps={self.num_inference_steps}"
            )
        return self


class DiffusionCompletionProbe(Probe[DiffusionCompletionParams]):
    """The base model denoises the first k+1 steps, the erased model finishes; one row per k."""

    name = "diffusion_completion"
    params_class = DiffusionCompletionParams
    smoke_params = {"handover_steps": [1]}
    requires = frozenset({"base_model"})
    sampler = "ddim"
    role = "recovery"
    needs_base_reference = False
    best_of_n = False
    base_reference = False
    baseline = False
    uses_base_trajectory = True  # its images are partly the base model's: not in the worst case over probes

    def expand_params(self, params: DiffusionCompletionParams) -> list[DiffusionCompletionParams]:
        base = params.model_dump()
        return [
            DiffusionCompletionParams.model_validate({**base, "handover_steps": [k]}) for k in params.handover_steps
        ]

    @torch.no_grad()
    def run(self, batch: ProbeBatch) -> ProbeOutput:
        params: DiffusionCompletionParams = batch.params
        if len(params.handover_steps) != 1:
            raise ValueError("a completion row holds one hand-over step; expand the params first (expand_params)")
        k = params.handover_steps[0]
        erased = batch.pipeline
        base = batch.context.base_pipeline()

        # 1. One DDIM schedule for both models; a completion across different noise schedules would
        #    hand over a latent at a noise level the erased model does not expect.
        schedule = sampling.DDIMSchedule.from_pipeline(base, params.num_inference_steps)
        erased_schedule = sampling.DDIMSchedule.from_pipeline(erased, params.num_inference_steps)
        if schedule.timesteps != erased_schedule.timesteps or not torch.allclose(
            schedule.alphas_cumprod, erased_schedule.alphas_cumprod
        ):
            raise ValueError("the base and erased models have different noise schedules; cannot hand over")

        # 2. x_T per row from its seed (the same start as the standard probe).
        latents = sampling.initial_latents(
            base, [row_generator(seed) for seed in batch.seeds], params.height, params.width
        )

        # 3. The base model's first k+1 deterministic steps, with its own text encoder.
        if k >= 0:
            base_embeddings = sampling.encode_prompts(
                base, batch.prompts, params.negative_prompt, params.guidance_scale
            )
            latents = sampling.denoise(
                base, latents, base_embeddings, schedule, params.guidance_scale, start_index=0, stop_index=k + 1
            )

        # 4. The erased model continues at timesteps[k+1] and finishes the schedule.
        if k + 1 < params.num_inference_steps:
            erased_embeddings = sampling.encode_prompts(
                erased, batch.prompts, params.negative_prompt, params.guidance_scale
            )
            latents = sampling.denoise(
                erased,
                latents.to(erased.device, erased.unet.dtype),
                erased_embeddings,
                schedule,
                params.guidance_scale,
                start_index=k + 1,
            )

        # 5. Decode with the erased pipeline's VAE (shared with the base in a UNet-only override).
        images = sampling.decode(erased, latents.to(erased.device, erased.vae.dtype))
        handover_timestep = schedule.timesteps[k + 1] if k + 1 < params.num_inference_steps else None
        extras = {
            "handover_step": k,
            "base_steps": k + 1,
            "erased_steps": params.num_inference_steps - k - 1,
            "handover_timestep": handover_timestep,
        }
        return ProbeOutput(images=images, extras=[dict(extras) for _ in batch.rows])
