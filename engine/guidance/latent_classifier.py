"""The time-conditioned latent classifier f(x_t, t) -> one logit (the original's LatentClassifierT).

Input: a noised latent x_t in the UNet's latent scale (VAE latent x scaling_factor, then noised)
and an integer timestep t in [0, num_train_timesteps). Time enters as the 2-d encoding
e(t) = [sqrt(abar_t), sqrt(1 - abar_t)], from the scheduler's alpha-bar table held as a buffer:

    h = Linear(flat -> H)(flatten(x_t)) + Linear(2 -> H)(e(t))
    logit = Linear(H/2 -> 1)(Dropout(SiLU(Linear(H -> H/2)(Dropout(SiLU(h))))))

For SD's 4x64x64 latents H = 1024 (the original's 16384 -> 1024 -> 512 -> 1, 17.3 M parameters);
H is sized from the latent shape (flat / 16, clamped to [64, 1024]) so the same architecture
serves the tiny 4x32x32 test models.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

ARCHITECTURE_NAME = "latent_mlp_t"


def default_hidden_size(latent_shape: tuple[int, ...]) -> int:
    return int(min(1024, max(64, math.prod(latent_shape) // 16)))


class LatentClassifier(nn.Module):
    alphas_cumprod: torch.Tensor  # a registered buffer (nn.Module's __getattr__ is typed Tensor | Module)

    def __init__(
        self,
        latent_shape: tuple[int, int, int],
        alphas_cumprod: torch.Tensor,
        hidden_size: int | None = None,
        dropout: float = 0.3,
    ):
        super().__init__()
        self.latent_shape = tuple(int(d) for d in latent_shape)
        self.hidden_size = int(hidden_size or default_hidden_size(self.latent_shape))
        self.dropout = float(dropout)
        flat = math.prod(self.latent_shape)
        self.latent_in = nn.Linear(flat, self.hidden_size)
        self.time_in = nn.Linear(2, self.hidden_size)
        self.head = nn.Sequential(
            nn.SiLU(),
            nn.Dropout(self.dropout),
            nn.Linear(self.hidden_size, self.hidden_size // 2),
            nn.SiLU(),
            nn.Dropout(self.dropout),
            nn.Linear(self.hidden_size // 2, 1),
        )
        self.register_buffer("alphas_cumprod", torch.as_tensor(alphas_cumprod, dtype=torch.float32).clone())

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.numel())

    def architecture(self) -> dict[str, Any]:
        return {
            "name": ARCHITECTURE_NAME,
            "latent_shape": list(self.latent_shape),
            "hidden_size": self.hidden_size,
            "dropout": self.dropout,
            "time_encoding": "[sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)]",
        }

    def time_encoding(self, timesteps: torch.Tensor) -> torch.Tensor:
        alpha_bar = self.alphas_cumprod[timesteps.long().to(self.alphas_cumprod.device)]
        return torch.stack([alpha_bar.sqrt(), (1 - alpha_bar).sqrt()], dim=-1)

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor | int) -> torch.Tensor:
        """latents (B, C, H, W), timesteps int or (B,) -> logits (B,), float32."""
        if tuple(latents.shape[1:]) != self.latent_shape:
            raise ValueError(
                f"latent classifier expects latents of shape {self.latent_shape}, got {tuple(latents.shape[1:])}"
            )
        batch = latents.shape[0]
        timesteps = torch.as_tensor(timesteps, device=latents.device)
        if timesteps.dim() == 0:
            timesteps = timesteps.expand(batch)
        weight = self.latent_in.weight
        hidden = self.latent_in(latents.reshape(batch, -1).to(weight.dtype))
        hidden = hidden + self.time_in(self.time_encoding(timesteps).to(weight.device, weight.dtype))
        return self.head(hidden).squeeze(-1).float()


def build_classifier(architecture: dict[str, Any], alphas_cumprod) -> LatentClassifier:
    if architecture.get("name") != ARCHITECTURE_NAME:
        raise ValueError(f"unknown latent classifier architecture {architecture.get('name')!r}")
    return LatentClassifier(
        latent_shape=tuple(architecture["latent_shape"]),
        alphas_cumprod=torch.as_tensor(alphas_cumprod, dtype=torch.float32),
        hidden_size=architecture["hidden_size"],
        dropout=architecture["dropout"],
    )
