"""Training of the toy pipeline: the VAE, then the UNet and text encoder on cached latents.

Recipe (feasibility notes): VAE with MSE + L1 + a tiny KL; latents of a fixed rendered set are
encoded once, so diffusion training never runs the VAE; UNet and text encoder trained jointly on
epsilon-prediction MSE with SD's noise schedule, AdamW, warm-up then cosine decay, gradient
clipping, EMA of the weights, and 10% of captions dropped to "" so classifier-free guidance works.
Every loop has a step count (reproducible) and a wall-time cap (a safety net, logged when hit).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch.nn import functional as F
from transformers import CLIPTextModel, CLIPTokenizer

from engine.toyworld.judge import to_tensor
from engine.toyworld.render import CONCEPTS, caption
from toyworld_training.models import training_scheduler

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoopSettings:
    steps: int
    batch_size: int
    lr: float
    max_seconds: float | None = None
    log_every: int = 50


def _cosine(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def train_vae(vae: AutoencoderKL, images: np.ndarray, settings: LoopSettings, seed: int,
              kl_weight: float = 1e-6, l1_weight: float = 0.5) -> dict[str, float]:
    """Trains `vae` in place on uint8 images; returns the last logged losses."""
    data = to_tensor(images)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _cosine(s, settings.steps, warmup=min(50, settings.steps // 10 + 1)))
    vae.train()
    start, running, last = time.monotonic(), 0.0, {}
    for step in range(1, settings.steps + 1):
        batch = data[torch.randint(0, len(data), (settings.batch_size,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample(generator=None)).sample
        mse = F.mse_loss(recon, batch)
        # L1 sharpens edges that MSE alone leaves blurry (the feasibility VAE was the quality ceiling).
        l1 = F.l1_loss(recon, batch)
        kl = posterior.kl().sum() / batch.shape[0]
        loss = mse + l1_weight * l1 + kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        running = mse.item() if step == 1 else 0.95 * running + 0.05 * mse.item()
        elapsed = time.monotonic() - start
        if step % settings.log_every == 0 or step == settings.steps:
            last = {"step": step, "mse": running, "kl": kl.item(), "seconds": elapsed}
            logger.info("vae step %d/%d mse %.4f kl %.1f (%.0f s, %.2f s/step)",
                        step, settings.steps, running, kl.item(), elapsed, elapsed / step)
        if settings.max_seconds is not None and elapsed > settings.max_seconds:
            logger.warning("vae: time budget reached at step %d of %d", step, settings.steps)
            last = {"step": step, "mse": running, "kl": kl.item(), "seconds": elapsed}
            break
    vae.eval()
    return last


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: np.ndarray, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image (unscaled), so training can sample latents cheaply."""
    means, stds = [], []
    for start in range(0, len(images), batch_size):
        dist = vae.encode(to_tensor(images[start:start + batch_size])).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def latent_scaling_factor(means: torch.Tensor) -> float:
    # SD convention: scale latents to unit variance (SD 1.x uses 0.18215 for the same purpose).
    return float(1.0 / means.std())


@torch.no_grad()
def encode_prompts(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, prompts: list[str]) -> torch.Tensor:
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids.to(text_encoder.device))[0]


class EMA:
    """Exponential moving average of parameters with the usual warm-up: decay min(d, (1+n)/(10+n))."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = copy.deepcopy(module).eval().requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for shadow, param in zip(self.shadow.parameters(), module.parameters(), strict=False):
            shadow.lerp_(param.detach(), 1.0 - decay)


def train_diffusion(unet: UNet2DConditionModel, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                    latent_mean: torch.Tensor, latent_std: torch.Tensor, labels: np.ndarray, scaling_factor: float,
                    settings: LoopSettings, seed: int, ema_decay: float = 0.999, caption_dropout: float = 0.1,
                    warmup: int = 100, weight_decay: float = 0.01,
                    on_log=None) -> tuple[UNet2DConditionModel, CLIPTextModel, dict[str, float]]:
    """Joint UNet + text-encoder training; returns the EMA copies and the last logged stats.

    `on_log(step, ema_unet, ema_text_encoder)` is called at every log point (the build uses it to
    checkpoint, so a crash loses at most one log interval)."""
    scheduler = training_scheduler()
    alphas = scheduler.alphas_cumprod
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    # Token ids of every caption once; the empty caption is the unconditional input of CFG.
    ids = tokenizer([caption(c) for c in CONCEPTS] + [""], padding="max_length",
                    max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    empty_index = len(CONCEPTS)
    label_tensor = torch.from_numpy(labels)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _cosine(s, settings.steps, warmup))
    ema_unet, ema_text = EMA(unet, ema_decay), EMA(text_encoder, ema_decay)
    unet.train()
    text_encoder.train()
    start, running, last = time.monotonic(), 0.0, {}
    for step in range(1, settings.steps + 1):
        index = torch.randint(0, len(latent_mean), (settings.batch_size,), generator=generator)
        noise0 = torch.randn(latent_mean[index].shape, generator=generator)
        latents = (latent_mean[index] + latent_std[index] * noise0) * scaling_factor
        caption_index = label_tensor[index].clone()
        caption_index[torch.rand(settings.batch_size, generator=generator) < caption_dropout] = empty_index
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (settings.batch_size,), generator=generator)
        noise = torch.randn(latents.shape, generator=generator)
        a = alphas[timesteps].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        hidden = text_encoder(ids[caption_index])[0]
        loss = F.mse_loss(unet(noisy, timesteps, encoder_hidden_states=hidden).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        ema_unet.update(unet)
        ema_text.update(text_encoder)
        running = loss.item() if step == 1 else 0.98 * running + 0.02 * loss.item()
        elapsed = time.monotonic() - start
        stop = settings.max_seconds is not None and elapsed > settings.max_seconds
        if step % settings.log_every == 0 or step == settings.steps or stop:
            last = {"step": step, "loss": running, "seconds": elapsed}
            logger.info("diffusion step %d/%d loss %.4f lr %.2e (%.0f s, %.2f s/step)", step, settings.steps,
                        running, schedule.get_last_lr()[0], elapsed, elapsed / step)
            if on_log is not None:
                on_log(step, ema_unet.shadow, ema_text.shadow)
        if stop:
            logger.warning("diffusion: time budget reached at step %d of %d", step, settings.steps)
            break
    return ema_unet.shadow, ema_text.shadow, last
