"""The shared denoising loop: DDIM with eta above 1, an extra noise multiplier, guidance hooks.

Probes that reshape the trajectory (noise, completion, classifier guidance) run this loop
instead of the pipeline's __call__, so every change to the sampler is explicit here:

- `ddim_step` is DDIM (Song et al. 2021, eq. 12) with two changes from the original's "noisy
  DDIM" (docs/deviations.md): the direction term takes |1 - abar_prev - sigma^2| so eta > 1
  gives no NaN, and the stochastic term is multiplied by `variance_scale` (v), which the
  original's pipeline silently dropped.
- eta and v are per-row tensors, so candidates of a sweep run as one batch.
- Each row draws its noise from its own CPU generator, so a row never depends on its batch.
- `guidance` is a hook (x_t, t, eps) -> eps, used by classifier guidance.
- `start_index` / `stop_index` run a slice of the schedule (diffusion completion hands over).
- `prompt_embeddings` encodes each distinct prompt once, alone, and keeps it per text encoder, so
  a unit of identical prompts (and the empty negative prompt of CFG) costs one text-encoder call.
- `base_reference_images` makes the base model's image of a (prompt, seed) once per grid and
  caches it on disk (inpainting context, textual-inversion data).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from engine.probe import row_generator, to_uint8

GuidanceHook = Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor]


@dataclass
class DDIMSchedule:
    """Timesteps and cumulative alphas of a DDIM schedule built from the model's scheduler config
    (for SD 1.4: scaled-linear betas, leading spacing, steps_offset 1 -> 981, 961, ..., 1)."""

    timesteps: list[int]
    alphas_cumprod: torch.Tensor  # float64, on the CPU
    final_alpha_cumprod: float
    step_ratio: int

    @classmethod
    def from_pipeline(cls, pipe, num_inference_steps: int) -> DDIMSchedule:
        from diffusers import DDIMScheduler  # here, not at import: planning a grid never loads diffusers

        scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        if scheduler.config.prediction_type != "epsilon":
            raise ValueError(f"only epsilon-prediction models are supported, not {scheduler.config.prediction_type}")
        scheduler.set_timesteps(num_inference_steps)
        return cls(
            timesteps=[int(t) for t in scheduler.timesteps],
            alphas_cumprod=scheduler.alphas_cumprod.to(torch.float64),
            final_alpha_cumprod=float(scheduler.final_alpha_cumprod),
            step_ratio=scheduler.config.num_train_timesteps // num_inference_steps,
        )

    def alpha_bar(self, t: int) -> float:
        return float(self.alphas_cumprod[t]) if t >= 0 else self.final_alpha_cumprod


def ddim_step(
    x_t: torch.Tensor,
    eps: torch.Tensor,
    alpha_bar_t: float,
    alpha_bar_prev: float,
    eta: torch.Tensor,
    variance_scale: torch.Tensor,
    noise: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step x_t -> x_{t-1}; returns (x_prev, x0_hat). eta, variance_scale: shape (B,)."""
    shape = (-1,) + (1,) * (x_t.dim() - 1)
    eta = eta.to(x_t.device, torch.float32).view(shape)
    variance_scale = variance_scale.to(x_t.device, torch.float32).view(shape)
    x0_hat = (x_t - (1 - alpha_bar_t) ** 0.5 * eps) / alpha_bar_t**0.5
    variance = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)
    sigma = eta * variance**0.5
    direction = torch.sqrt(torch.abs(1 - alpha_bar_prev - sigma**2)) * eps
    x_prev = alpha_bar_prev**0.5 * x0_hat + direction
    if noise is not None:
        x_prev = x_prev + sigma * variance_scale * noise
    return x_prev.to(x_t.dtype), x0_hat


@torch.no_grad()
def encode_prompts(pipe, prompts: Sequence[str], negative_prompt: str, guidance_scale: float) -> torch.Tensor:
    """Text embeddings, [uncond; cond] stacked when classifier-free guidance is on."""
    cond = prompt_embeddings(pipe, prompts)
    if guidance_scale <= 1.0:
        return cond
    return torch.cat([prompt_embeddings(pipe, [negative_prompt] * len(prompts)), cond])


PROMPT_CACHE_SIZE = 256  # distinct prompts kept per text encoder; a grid has a few per concept


@torch.no_grad()
def prompt_embeddings(pipe, prompts: Sequence[str]) -> torch.Tensor:
    """The text encoder's output for each prompt, (len(prompts), tokens, hidden), as the pipeline's
    encode_prompt makes it. Each distinct prompt is encoded alone and kept (least recently used
    dropped beyond PROMPT_CACHE_SIZE) per text encoder, so its embedding is the same whatever batch
    or unit it comes in, and a repeated prompt costs nothing. Changing the encoder's weights in
    place, moving it or swapping its input embeddings (textual inversion) makes new entries."""
    encoder = pipe.text_encoder
    state = (
        id(pipe.tokenizer),
        id(encoder.get_input_embeddings()),
        str(encoder.device),
        str(encoder.dtype),
        sum(p._version for p in encoder.parameters()),  # bumped by every in-place update
    )
    with _PROMPT_LOCK:
        cache = _PROMPT_EMBEDDINGS.setdefault(encoder, OrderedDict())
    rows = []
    for prompt in prompts:
        key = (state, prompt)
        with _PROMPT_LOCK:
            embedding = cache.get(key)
            if embedding is not None:
                cache.move_to_end(key)
        if embedding is None:
            embedding, _ = pipe.encode_prompt(
                [prompt], device=pipe.device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
            with _PROMPT_LOCK:
                cache[key] = embedding
                while len(cache) > PROMPT_CACHE_SIZE:
                    cache.popitem(last=False)
        rows.append(embedding)
    return torch.cat(rows)


_PROMPT_EMBEDDINGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_PROMPT_LOCK = threading.Lock()


def initial_latents(pipe, generators: Sequence[torch.Generator], height: int | None, width: int | None):
    """x_T per row from its own CPU generator (the same draw as the pipeline's prepare_latents)."""
    scale = pipe.vae_scale_factor
    height = height or pipe.unet.config.sample_size * scale
    width = width or pipe.unet.config.sample_size * scale
    shape = (1, pipe.unet.config.in_channels, height // scale, width // scale)
    latents = torch.cat([torch.randn(shape, generator=g, dtype=pipe.unet.dtype) for g in generators])
    return latents.to(pipe.device) * pipe.scheduler.init_noise_sigma


def predict_noise(pipe, latents: torch.Tensor, t: int, embeddings: torch.Tensor, guidance_scale: float):
    """eps with classifier-free guidance: eps_u + s (eps_c - eps_u)."""
    if guidance_scale > 1.0:
        model_input = torch.cat([latents, latents])
        eps_uncond, eps_cond = pipe.unet(model_input, t, encoder_hidden_states=embeddings).sample.chunk(2)
        return eps_uncond + guidance_scale * (eps_cond - eps_uncond)
    return pipe.unet(latents, t, encoder_hidden_states=embeddings).sample


def denoise(
    pipe,
    latents: torch.Tensor,
    embeddings: torch.Tensor,
    schedule: DDIMSchedule,
    guidance_scale: float,
    eta: torch.Tensor | None = None,
    variance_scale: torch.Tensor | None = None,
    generators: Sequence[torch.Generator] | None = None,
    guidance: GuidanceHook | None = None,
    start_index: int = 0,
    stop_index: int | None = None,
) -> torch.Tensor:
    """Run schedule steps [start_index, stop_index) from `latents` (which sit at timestep
    schedule.timesteps[start_index]) and return the latents after the last step.

    Noise for row i at each step is drawn from generators[i] on the CPU, only when some eta > 0.
    """
    batch = latents.shape[0]
    eta = torch.zeros(batch) if eta is None else torch.as_tensor(eta, dtype=torch.float32)
    variance_scale = torch.ones(batch) if variance_scale is None else torch.as_tensor(variance_scale)
    stochastic = bool((eta > 0).any())
    if stochastic and (generators is None or len(generators) != batch):
        raise ValueError("eta > 0 needs one generator per row")
    stop_index = len(schedule.timesteps) if stop_index is None else stop_index
    for index in range(start_index, stop_index):
        t = schedule.timesteps[index]
        with torch.no_grad():
            eps = predict_noise(pipe, latents, t, embeddings, guidance_scale)
        if guidance is not None:
            eps = guidance(latents, t, eps)
        noise = None
        if stochastic:
            assert generators is not None  # checked before the loop: one generator per row
            noise = torch.cat([torch.randn((1, *latents.shape[1:]), generator=g) for g in generators])
            noise = noise.to(latents.device)
        latents, _ = ddim_step(
            latents,
            eps,
            schedule.alpha_bar(t),
            schedule.alpha_bar(t - schedule.step_ratio),
            eta,
            variance_scale,
            noise,
        )
    return latents


@torch.no_grad()
def decode(pipe, latents: torch.Tensor) -> list[np.ndarray]:
    """Latents -> uint8 images, as the pipeline's own decode and postprocess do."""
    images = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    images = (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
    return to_uint8(images)


def generate(
    pipe,
    prompts: Sequence[str],
    generators: Sequence[torch.Generator],
    num_inference_steps: int,
    guidance_scale: float,
    negative_prompt: str = "",
    height: int | None = None,
    width: int | None = None,
    eta: torch.Tensor | None = None,
    variance_scale: torch.Tensor | None = None,
    guidance: GuidanceHook | None = None,
) -> list[np.ndarray]:
    """Text -> images through `denoise`: the whole schedule, one generator per row (it draws x_T
    first, then the step noise)."""
    schedule = DDIMSchedule.from_pipeline(pipe, num_inference_steps)
    embeddings = encode_prompts(pipe, prompts, negative_prompt, guidance_scale)
    latents = initial_latents(pipe, generators, height, width)
    latents = denoise(
        pipe, latents, embeddings, schedule, guidance_scale, eta, variance_scale, generators, guidance
    )
    return decode(pipe, latents)


# --------------------------------------------------------------------------- base-model references


def pipeline_images(pipe, params: Any, prompt_embeds: torch.Tensor, negative_embeds: torch.Tensor | None,
                    generators: Sequence[torch.Generator]) -> list[np.ndarray]:
    """uint8 images from the model's own pipeline and scheduler (the standard prompt's way), one per
    row of `prompt_embeds`; `params` gives num_inference_steps, guidance_scale, height and width."""
    result = pipe(
        prompt_embeds=prompt_embeds,
        negative_prompt_embeds=negative_embeds,
        num_inference_steps=params.num_inference_steps,
        guidance_scale=params.guidance_scale,
        height=params.height,
        width=params.width,
        generator=list(generators),
        output_type="np",
    )
    return to_uint8(result.images)


def weights_fingerprint(pipe) -> str:
    """A content hash of a pipeline's weights (UNet, text encoder, VAE) and scheduler config, cheap
    enough for SD 1.4 on a GPU: per tensor its name, shape, dtype, sum and absolute sum, reduced on
    the device and moved once. Memoised per pipeline object."""
    cached = _FINGERPRINTS.get(pipe)
    if cached is not None:
        return cached
    digest = hashlib.sha256(json.dumps(dict(pipe.scheduler.config), sort_keys=True, default=str).encode())
    for part in ("unet", "text_encoder", "vae"):
        module = getattr(pipe, part)
        state = module.state_dict()
        with torch.no_grad():
            sums = torch.stack([torch.stack([t.double().sum(), t.double().abs().sum()]) for t in state.values()])
        meta = [(name, list(t.shape), str(t.dtype)) for name, t in state.items()]
        digest.update(json.dumps([part, type(module).__name__, meta], separators=(",", ":")).encode())
        digest.update(sums.cpu().numpy().tobytes())
    _FINGERPRINTS[pipe] = digest.hexdigest()
    return _FINGERPRINTS[pipe]


_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def base_reference_images(context, rows, params) -> tuple[list[np.ndarray], list[str]]:
    """The base model's plain image for each row's (prompt, seed): the standard probe's call on the
    base pipeline with `params`' generation settings (steps, CFG, negative prompt, size).

    Made once per (base model, concept, prompt, seed, settings) and cached on disk under
    `context.cache_dir/reference_images/<key>.png` (key: a content hash of all of these, the base
    weights' fingerprint included), so every erased model of a grid and every probe that needs
    the base image (inpainting, textual inversion) reuses it. Returns (images, cache keys)."""
    base = context.base_pipeline()
    folder = Path(context.cache_dir) / "reference_images"
    folder.mkdir(parents=True, exist_ok=True)
    identity = {
        "base": weights_fingerprint(base),
        "device": base.device.type,
        "dtype": str(base.unet.dtype),
        "num_inference_steps": params.num_inference_steps,
        "guidance_scale": params.guidance_scale,
        "negative_prompt": params.negative_prompt,
        "height": params.height,
        "width": params.width,
    }
    keys, identities = [], []
    for row in rows:
        row_identity = {**identity, "concept": row.concept, "prompt": row.prompt, "seed": row.seed}
        text = json.dumps(row_identity, sort_keys=True, separators=(",", ":"))
        keys.append(hashlib.sha256(text.encode()).hexdigest()[:32])
        identities.append(row_identity)
    missing = sorted({i for i, key in enumerate(keys) if not (folder / f"{key}.png").exists()})
    if missing:
        # One batched call for every reference not yet on disk; one generator per row, as the
        # standard probe, so the reference is the base model's standard_prompt image.
        result = base(
            prompt=[rows[i].prompt for i in missing],
            negative_prompt=[params.negative_prompt] * len(missing) if params.negative_prompt else None,
            num_inference_steps=params.num_inference_steps,
            guidance_scale=params.guidance_scale,
            height=params.height,
            width=params.width,
            generator=[row_generator(rows[i].seed) for i in missing],
            output_type="np",
        )
        for i, image in zip(missing, to_uint8(result.images), strict=False):
            # Write then rename: actors of one grid may race on the same key; os.replace is atomic.
            temporary = folder / f"{keys[i]}.{os.getpid()}.tmp"
            Image.fromarray(image).save(temporary, format="PNG")
            os.replace(temporary, folder / f"{keys[i]}.png")
            (folder / f"{keys[i]}.json").write_text(json.dumps(identities[i], sort_keys=True, indent=1))
    images = [np.asarray(Image.open(folder / f"{key}.png").convert("RGB")) for key in keys]
    return images, keys
