"""Training loop of the latent classifier (the original's, with its bugs fixed:
docs/deviations.md).

Each batch of clean latents x0 is replicated K times; every copy gets its own timestep
t = floor(u^(1/p) * (T - 1)) (p = 3 favours noisy timesteps: the density grows like t^2) and its
own noise, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps. The loss is BCE weighted by
pos_weight = n_neg / n_pos; AdamW, gradient norm clipped to 1. Validation each epoch averages the
logits of `val_draws` (t, noise) draws per sample (the same draws every epoch, so epochs compare)
and reports BCE, ROC-AUC, PR-AUC and TPR at 5 % FPR; the best checkpoint is the one with the
lowest validation loss.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from classifier_training.metrics import binary_metrics
from engine.guidance.latent_classifier import LatentClassifier

logger = logging.getLogger(__name__)


class TrainSettings(BaseModel):
    """Training hyperparameters; defaults are the original's. NaN and infinities are rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    epochs: int = Field(70, ge=1, description="Passes over the training latents (the original's e2e default: 70).")
    batch_size: int = Field(8, ge=1, description="Clean latents per batch, before replication.")
    learning_rate: float = Field(1e-4, gt=0, description="AdamW learning rate.")
    weight_decay: float = Field(1e-3, ge=0, description="AdamW weight decay.")
    grad_clip: float = Field(1.0, gt=0, description="Gradient norm clipping.")
    replicas: int = Field(7, ge=1, description="K: copies of each batch, each with its own (t, noise).")
    timestep_power: float = Field(3.0, gt=0, description="p in t = floor(u^(1/p) (T-1)); p > 1 favours noisy t.")
    val_draws: int = Field(3, ge=1, description="(t, noise) draws per validation sample; logits averaged.")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="Share of each class held out for validation.")
    hidden_size: int | None = Field(None, ge=2, description="MLP width; default sized from the latent shape.")
    dropout: float = Field(0.3, ge=0, lt=1, description="Dropout in the MLP head.")
    seed: int = Field(42, description="Seed of the split, initialisation, batches, timesteps and noise.")


@dataclass
class LatentSet:
    """Clean latents (N, C, H, W) in the UNet's scale and their 0/1 labels (N,)."""

    latents: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self):
        self.latents = self.latents.float()
        self.labels = self.labels.float().reshape(-1)
        if self.latents.shape[0] != self.labels.shape[0]:
            raise ValueError("one label per latent")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def positives(self) -> int:
        return int(self.labels.sum())

    @property
    def negatives(self) -> int:
        return len(self) - self.positives


@dataclass
class TrainResult:
    model: LatentClassifier  # holds the best checkpoint's weights
    history: list[dict[str, float]]
    best_epoch: int
    best_metrics: dict[str, float]
    pos_weight: float
    counts: dict[str, int] = field(default_factory=dict)


def split_train_val(data: LatentSet, val_fraction: float, seed: int) -> tuple[LatentSet, LatentSet]:
    """Stratified split: each class keeps round(val_fraction * n) (at least 1) for validation, so
    validation always has both classes and ROC-AUC is defined."""
    generator = torch.Generator().manual_seed(seed)
    train_index, val_index = [], []
    for label in (1.0, 0.0):
        members = torch.nonzero(data.labels == label).flatten()
        if members.numel() < 2:
            kind = "positive" if label else "negative"
            raise ValueError(f"need at least 2 {kind} images to train and validate, got {members.numel()}")
        members = members[torch.randperm(members.numel(), generator=generator)]
        n_val = min(members.numel() - 1, max(1, round(val_fraction * members.numel())))
        val_index.append(members[:n_val])
        train_index.append(members[n_val:])
    train_index, val_index = torch.cat(train_index), torch.cat(val_index)
    return (
        LatentSet(data.latents[train_index], data.labels[train_index]),
        LatentSet(data.latents[val_index], data.labels[val_index]),
    )


def sample_timesteps(count: int, num_train_timesteps: int, power: float, generator: torch.Generator) -> torch.Tensor:
    u = torch.rand(count, generator=generator, dtype=torch.float64)
    return torch.floor(u ** (1.0 / power) * (num_train_timesteps - 1)).long()


def add_noise(x0: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, noise: torch.Tensor):
    alpha_bar = alphas_cumprod.to(x0.device)[timesteps.to(x0.device)].float().view(-1, *([1] * (x0.dim() - 1)))
    return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise


def _noised_copies(x0, alphas_cumprod, power, copies, generator):
    """`copies` noised versions of each latent of x0: (copies * B, ...) plus their timesteps."""
    repeated = x0.repeat(copies, *([1] * (x0.dim() - 1)))
    timesteps = sample_timesteps(repeated.shape[0], alphas_cumprod.numel(), power, generator)
    noise = torch.randn(repeated.shape, generator=generator).to(x0.device)
    return add_noise(repeated, timesteps, alphas_cumprod, noise), timesteps.to(x0.device)


@torch.no_grad()
def validation_logits(model: LatentClassifier, data: LatentSet, settings: TrainSettings, device) -> torch.Tensor:
    """Mean logit over `val_draws` fixed (t, noise) draws per sample."""
    model.eval()
    generator = torch.Generator().manual_seed(settings.seed + 1)
    total = torch.zeros(len(data))
    for _ in range(settings.val_draws):
        for start in range(0, len(data), 256):
            x0 = data.latents[start : start + 256].to(device)
            x_t, timesteps = _noised_copies(x0, model.alphas_cumprod, settings.timestep_power, 1, generator)
            total[start : start + 256] += model(x_t, timesteps).cpu()
    return total / settings.val_draws


def train_classifier(
    train: LatentSet,
    val: LatentSet,
    alphas_cumprod: torch.Tensor,
    settings: TrainSettings,
    device: torch.device | str = "cpu",
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> TrainResult:
    device = torch.device(device)
    if train.positives == 0 or train.negatives == 0:
        raise ValueError("the training set needs both positive and negative latents")
    torch.manual_seed(settings.seed)  # initialisation and dropout
    model = LatentClassifier(
        tuple(train.latents.shape[1:]), alphas_cumprod, settings.hidden_size, settings.dropout
    ).to(device)
    pos_weight = train.negatives / train.positives
    pos_weight_tensor = torch.tensor(pos_weight, device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    generator = torch.Generator().manual_seed(settings.seed)
    history: list[dict[str, float]] = []
    best_state: dict[str, Any] | None = None
    best: dict[str, float] = {}
    for epoch in range(1, settings.epochs + 1):
        started = time.perf_counter()
        # 1. One pass over shuffled batches, each replicated K times with fresh (t, noise).
        model.train()
        order = torch.randperm(len(train), generator=generator)
        train_loss, seen = 0.0, 0
        for start in range(0, len(train), settings.batch_size):
            index = order[start : start + settings.batch_size]
            x0, labels = train.latents[index].to(device), train.labels[index].to(device)
            x_t, timesteps = _noised_copies(x0, model.alphas_cumprod, settings.timestep_power, settings.replicas,
                                            generator)
            logits = model(x_t, timesteps)
            loss = F.binary_cross_entropy_with_logits(
                logits, labels.repeat(settings.replicas), pos_weight=pos_weight_tensor
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
            optimizer.step()
            train_loss += loss.item() * logits.shape[0]
            seen += logits.shape[0]
        # 2. Validation: logits averaged over fixed draws, weighted BCE and ranking metrics.
        val_logits = validation_logits(model, val, settings, device)
        val_loss = float(F.binary_cross_entropy_with_logits(val_logits, val.labels, pos_weight=pos_weight_tensor.cpu()))
        row = {
            "epoch": epoch,
            "train_loss": train_loss / max(seen, 1),
            "val_loss": val_loss,
            **binary_metrics(val.labels.numpy(), val_logits.numpy()),
            "seconds": time.perf_counter() - started,
        }
        history.append(row)
        # 3. Keep the checkpoint with the lowest validation loss.
        if best_state is None or (math.isfinite(val_loss) and val_loss < best["val_loss"]):
            best_state = copy.deepcopy(model.state_dict())
            best = dict(row)
        logger.info("epoch %d: train %.4f val %.4f roc-auc %.3f", epoch, row["train_loss"], val_loss, row["roc_auc"])
        if on_epoch is not None:
            on_epoch(row)
    model.load_state_dict(best_state)
    model.eval()
    counts = {"train_positive": train.positives, "train_negative": train.negatives,
              "val_positive": val.positives, "val_negative": val.negatives}
    return TrainResult(model, history, int(best["epoch"]), best, pos_weight, counts)
