"""Textual inversion (Gal et al. 2022), in-process: learn one new token embedding on a pipeline.

The recipe is diffusers' examples/textual_inversion/textual_inversion.py as the original ran it
(`--learnable_property=object` for every concept, artists included): DDPM noise from the model's
scheduler config, epsilon MSE, templates "a photo of a {}" (object) or "a painting in the style of
{}" (style), horizontal flips with p=0.5,
AdamW (0.9, 0.999, weight decay 1e-2), learning rate scaled by accumulation x batch (5e-4 x 4 =
2e-3), constant schedule, one vector initialised from the initializer token.

What differs, by design:
- Only the new vector is a parameter. The shared pipeline is never changed: the placeholder is
  added to a *copy* of the tokenizer, and the text encoder's input-embedding module is swapped for
  a wrapper (frozen table + the new vector) only inside `extra_token_embedding`, restored in
  `finally`. Gradients are taken with autograd.grad w.r.t. the vector, so no `.grad` lands on the
  shared UNet or text encoder. (diffusers resizes the whole table and resets every other row after
  each step: the same update for the new row.)
- VAE posteriors of the images and their flips are computed once; each step samples from them.
- A multi-token initializer (e.g. on the tiny byte-level tokenizer) starts from the mean of its
  tokens' embeddings; a single token is exactly the original's initialisation.
- Results are cached by content hash (model weights, concept, settings, reference images) under
  `<cache_dir>/textual_inversion/<key>/learned_embeds.safetensors` (diffusers' format, loadable
  with `pipe.load_textual_inversion`) + `info.json`, with a file lock so two actors never train
  the same embedding twice.

Where training runs: `ensure_embedding` is a plain function of (pipeline, images, settings,
cache_dir). The probe calls it inside its probe actor, which holds the run's GPU when the cluster
has one; because the cache is content-addressed, a driver-side Ray task (num_gpus=1) calling the
same function before the probe stage would fill the cache and the actors would only load it.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file
from torch import nn

logger = logging.getLogger(__name__)

OBJECT_TEMPLATES = [  # diffusers' imagenet_templates_small
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}",
    "a cropped photo of a {}", "a photo of the {}", "a good photo of the {}", "a photo of one {}",
    "a close-up photo of the {}", "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}",
    "a photo of a nice {}", "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}",
    "a photo of the weird {}", "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
]
STYLE_TEMPLATES = [  # diffusers' imagenet_style_templates_small
    "a painting in the style of {}", "a rendering in the style of {}", "a cropped painting in the style of {}",
    "the painting in the style of {}", "a clean painting in the style of {}", "a dirty painting in the style of {}",
    "a dark painting in the style of {}", "a picture in the style of {}", "a cool painting in the style of {}",
    "a close-up painting in the style of {}", "a bright painting in the style of {}",
    "a cropped painting in the style of {}", "a good painting in the style of {}",
    "a close-up painting in the style of {}", "a rendition in the style of {}", "a nice painting in the style of {}",
    "a small painting in the style of {}", "a weird painting in the style of {}", "a large painting in the style of {}",
]


def training_templates(learnable_property: str) -> list[str]:
    """The caption templates of training: diffusers' object set, or its style set."""
    return STYLE_TEMPLATES if learnable_property == "style" else OBJECT_TEMPLATES


class TextualInversionSettings(BaseModel):
    """Everything that changes the learned vector; part of the cache key."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    placeholder_token: str
    initializer_token: str = "object"
    learnable_property: Literal["object", "style"] = "object"
    max_train_steps: int = Field(3000, ge=1)
    learning_rate: float = Field(5e-4, gt=0)
    scale_lr: bool = True
    train_batch_size: int = Field(1, ge=1)
    gradient_accumulation_steps: int = Field(4, ge=1)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    flip_p: float = Field(0.5, ge=0, le=1)
    resolution: int | None = None  # None: the model's native size
    seed: int = 0

    @property
    def effective_learning_rate(self) -> float:
        scale = self.gradient_accumulation_steps * self.train_batch_size if self.scale_lr else 1
        return self.learning_rate * scale


@dataclass
class LearnedEmbedding:
    """A trained (or cached) token embedding and what made it."""

    token: str
    vector: torch.Tensor  # (hidden,), float32, CPU
    key: str
    info: dict  # info.json: settings, image keys, per-step losses, fixed-draw losses, seconds
    trained_now: bool  # False: loaded from the cache


# --------------------------------------------------------------------------- encoding with the token


class ExtendedEmbedding(nn.Module):
    """The frozen token table, plus rows of `extra` for the ids first_id, first_id + 1, ... (the
    placeholder tokens a tokenizer copy appended after its vocabulary).
    """

    def __init__(self, base: nn.Embedding, extra: torch.Tensor, first_id: int):
        super().__init__()
        self.base, self.extra, self.first_id = base, extra, first_id

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_extra = input_ids >= self.first_id
        embedded = self.base(torch.where(is_extra, 0, input_ids))
        extra = self.extra.to(embedded.device, embedded.dtype)[(input_ids - self.first_id).clamp(min=0)]
        return torch.where(is_extra.unsqueeze(-1), extra, embedded)


@contextmanager
def extra_token_embedding(text_encoder, extra: torch.Tensor, first_id: int) -> Iterator[None]:
    """Inside the block, token ids first_id + i embed as extra[i] (extra: (k, hidden))."""
    table = text_encoder.get_input_embeddings()
    owner, attribute = next(
        (module, name)
        for module in text_encoder.modules()
        for name, child in module.named_children()
        if child is table
    )
    setattr(owner, attribute, ExtendedEmbedding(table, extra, first_id))
    try:
        yield
    finally:
        setattr(owner, attribute, table)


def placeholder_tokenizer(tokenizer, token: str):
    """A copy of `tokenizer` that knows `token` (the shared one is never changed), and its id."""
    tokenizer = copy.deepcopy(tokenizer)
    if tokenizer.add_tokens([token]) != 1:
        raise ValueError(f"the tokenizer already has a token {token!r}; choose another placeholder_token")
    return tokenizer, tokenizer.convert_tokens_to_ids(token)


def token_ids(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Token ids padded to the tokenizer's length, as the pipeline tokenizes prompts."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def encode_with_token(pipe, prompts: list[str], token: str, vector: torch.Tensor) -> torch.Tensor:
    """Prompt embeddings as the pipeline's encode_prompt makes them, with `token` embedded as
    `vector`. A prompt without the token gets exactly the pipeline's own embedding.
    """
    tokenizer, token_id = placeholder_tokenizer(pipe.tokenizer, token)
    ids = token_ids(tokenizer, prompts).to(pipe.text_encoder.device)
    with extra_token_embedding(pipe.text_encoder, vector.reshape(1, -1), token_id):
        embeddings = pipe.text_encoder(ids)[0]
    return embeddings.to(pipe.text_encoder.dtype)


# --------------------------------------------------------------------------- training


@torch.no_grad()
def image_posteriors(pipe, images: list[np.ndarray], resolution: int, flips: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior (mean, std) of each image (and its mirror image when `flips`), float32."""
    pixels = []
    for image in images:
        resized = np.asarray(
            Image.fromarray(image).convert("RGB").resize((resolution, resolution), Image.Resampling.BICUBIC)
        )
        tensor = torch.from_numpy(resized.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)
        pixels.extend([tensor, tensor.flip(-1)] if flips else [tensor])
    means, stds = [], []
    for start in range(0, len(pixels), 8):
        batch = torch.stack(pixels[start : start + 8]).to(pipe.vae.device, pipe.vae.dtype)
        posterior = pipe.vae.encode(batch).latent_dist
        means.append(posterior.mean.float())
        stds.append(posterior.std.float())
    return torch.cat(means), torch.cat(stds)


@dataclass
class TrainingOutcome:
    """What one training produced: the vector and its losses."""

    vector: torch.Tensor  # (hidden,), float32, CPU
    losses: list[float]  # one per optimisation step (mean of its accumulated micro-batches)
    # The loss on the same fixed draws (images, flips, templates, t, noise) before and after
    # training: unlike the per-step losses, the two are comparable.
    fixed_draw_loss_initial: float
    fixed_draw_loss_final: float


def train_textual_inversion(
    pipe, images: list[np.ndarray], settings: TextualInversionSettings,
    on_step: Callable[[int, float], None] | None = None, fixed_draws: int = 8,
) -> TrainingOutcome:
    """Learn the placeholder's vector on `pipe` from `images` (uint8 HxWx3)."""
    if not images:
        raise ValueError("textual inversion needs at least one reference image")
    device, unet, text_encoder = pipe.unet.device, pipe.unet, pipe.text_encoder
    generator = torch.Generator("cpu").manual_seed(settings.seed)
    # 1. The placeholder in a tokenizer copy, its vector initialised from the initializer token(s).
    tokenizer, token_id = placeholder_tokenizer(pipe.tokenizer, settings.placeholder_token)
    init_ids = tokenizer.encode(settings.initializer_token, add_special_tokens=False)
    if not init_ids:
        raise ValueError(f"initializer token {settings.initializer_token!r} encodes to no token")
    table = text_encoder.get_input_embeddings().weight
    vector = nn.Parameter(table[init_ids].detach().float().mean(0).clone())
    # 2. Training data: posteriors once; DDPM's alpha-bar table from the model's scheduler config.
    resolution = settings.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    means, stds = image_posteriors(pipe, images, resolution, flips=settings.flip_p > 0)
    scaling = pipe.vae.config.scaling_factor
    from diffusers import DDPMScheduler  # here, not at import: planning a grid never loads diffusers

    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(device)
    templates = training_templates(settings.learnable_property)
    optimizer = torch.optim.AdamW(
        [vector], lr=settings.effective_learning_rate, betas=(settings.adam_beta1, settings.adam_beta2),
        weight_decay=settings.adam_weight_decay, eps=settings.adam_epsilon,
    )
    # fp16 weights on CUDA: scale the loss so small gradients survive, as accelerate's fp16 does.
    scaler = torch.amp.GradScaler(device.type, enabled=unet.dtype == torch.float16)
    losses: list[float] = []

    def fixed_draw_loss() -> float:
        draws = torch.Generator("cpu").manual_seed(settings.seed + 1)
        with torch.no_grad():
            return float(np.mean([
                _micro_batch_loss(pipe, tokenizer, templates, means, stds, scaling, alphas_cumprod, settings, draws)
                .item() for _ in range(fixed_draws)
            ]))

    with extra_token_embedding(text_encoder, vector.unsqueeze(0), token_id):
        initial = fixed_draw_loss()
        for step in range(settings.max_train_steps):
            vector.grad = torch.zeros_like(vector)
            step_loss = 0.0
            for _ in range(settings.gradient_accumulation_steps):
                loss = _micro_batch_loss(pipe, tokenizer, templates, means, stds, scaling, alphas_cumprod,
                                         settings, generator)
                loss = loss / settings.gradient_accumulation_steps
                (gradient,) = torch.autograd.grad(scaler.scale(loss), [vector])
                vector.grad += gradient
                step_loss += loss.item()
            scaler.step(optimizer)
            scaler.update()
            losses.append(step_loss)
            if on_step is not None:
                on_step(step, step_loss)
        final = fixed_draw_loss()
    return TrainingOutcome(vector.detach().cpu().float(), losses, initial, final)


def _micro_batch_loss(pipe, tokenizer, templates, means, stds, scaling, alphas_cumprod, settings, generator):
    """Epsilon MSE of one batch: random images (flipped with p=flip_p), templates, t and noise."""
    batch = settings.train_batch_size
    picks = torch.randint(0, len(means) // (2 if settings.flip_p > 0 else 1), (batch,), generator=generator)
    if settings.flip_p > 0:
        flipped = (torch.rand(batch, generator=generator) < settings.flip_p).long()
        picks = picks * 2 + flipped
    mean, std = means[picks.to(means.device)], stds[picks.to(stds.device)]
    latents = (mean + std * torch.randn(mean.shape, generator=generator).to(mean.device)) * scaling
    noise = torch.randn(latents.shape, generator=generator).to(latents.device)
    timesteps = torch.randint(0, alphas_cumprod.numel(), (batch,), generator=generator).to(latents.device)
    alpha_bar = alphas_cumprod[timesteps].view(-1, 1, 1, 1).float()
    noisy = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise
    texts = [templates[int(i)].format(settings.placeholder_token)
             for i in torch.randint(0, len(templates), (batch,), generator=generator)]
    hidden = pipe.text_encoder(token_ids(tokenizer, texts).to(pipe.text_encoder.device))[0]
    prediction = pipe.unet(noisy.to(pipe.unet.dtype), timesteps, encoder_hidden_states=hidden.to(pipe.unet.dtype))
    return F.mse_loss(prediction.sample.float(), noise.float())


# --------------------------------------------------------------------------- cache


def embedding_key(
    model_fingerprint: str, concept: str, settings: TextualInversionSettings, image_keys: list[str]
) -> str:
    """The cache key of an embedding: model, concept, settings and the training images' keys."""
    identity = {"model": model_fingerprint, "concept": concept, "settings": settings.model_dump(mode="json"),
                "images": list(image_keys)}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


def ensure_embedding(
    pipe, concept: str, images: list[np.ndarray], image_keys: list[str], settings: TextualInversionSettings,
    model_fingerprint: str, cache_dir: str | Path,
) -> LearnedEmbedding:
    """The learned embedding of (model, concept, settings, images): from the cache, or trained now
    and cached. A lock file serialises actors that need the same embedding.
    """
    key = embedding_key(model_fingerprint, concept, settings, image_keys)
    folder = Path(cache_dir) / "textual_inversion" / key
    folder.mkdir(parents=True, exist_ok=True)
    weights, info_path = folder / "learned_embeds.safetensors", folder / "info.json"
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if weights.is_file() and info_path.is_file():
                info = json.loads(info_path.read_text())
                vector = load_file(str(weights))[settings.placeholder_token].reshape(-1).float()
                return LearnedEmbedding(settings.placeholder_token, vector, key, info, False)
            started = time.perf_counter()
            logger.info("textual inversion for %s: %d steps on %s", concept, settings.max_train_steps, pipe.device)
            outcome = train_textual_inversion(pipe, images, settings)
            info = {"concept": concept, "model": model_fingerprint, "settings": settings.model_dump(mode="json"),
                    "images": list(image_keys), "losses": outcome.losses,
                    "fixed_draw_loss_initial": outcome.fixed_draw_loss_initial,
                    "fixed_draw_loss_final": outcome.fixed_draw_loss_final, "seconds": time.perf_counter() - started}
            temporary = folder / "learned_embeds.tmp"
            save_file({settings.placeholder_token: outcome.vector.reshape(1, -1).contiguous()}, str(temporary))
            info_path.with_suffix(".tmp").write_text(json.dumps(info, indent=1))
            temporary.replace(weights)
            info_path.with_suffix(".tmp").replace(info_path)
            return LearnedEmbedding(settings.placeholder_token, outcome.vector, key, info, True)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
