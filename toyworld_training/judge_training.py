"""Trains the toy judge on rendered shapes (mildly blurred and noised, like generated images) and
saves it where engine/toyworld's runtime judge loads it."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.nn import functional as F

from engine.toyworld.judge import JUDGE_VERSION, ToyJudgeNet, to_tensor
from engine.toyworld.render import CONCEPTS, render_dataset

logger = logging.getLogger(__name__)


def _augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    # Generated images are blurrier and noisier than rendered ones (the VAE is small), so train
    # on mildly blurred and noised renders to judge shape, not rendering crispness.
    blur = torch.rand(batch.shape[0], 1, 1, 1, generator=generator) < 0.5
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None, :] / 16.0).expand(3, 1, 3, 3)
    blurred = F.conv2d(F.pad(batch, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    batch = torch.where(blur, blurred, batch)
    noise_level = torch.rand(batch.shape[0], 1, 1, 1, generator=generator) * 0.1
    return batch + noise_level * torch.randn(batch.shape, generator=generator)


def train_judge(num_per_concept: int, steps: int, seed: int, batch_size: int = 128, lr: float = 2e-3,
                max_seconds: float | None = None, width: int = 32) -> ToyJudgeNet:
    images, labels = render_dataset(num_per_concept, seed=seed)
    data, targets = to_tensor(images), torch.from_numpy(labels)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = ToyJudgeNet(width=width)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    net.train()
    start = time.monotonic()
    for step in range(1, steps + 1):
        index = torch.randint(0, len(data), (batch_size,), generator=generator)
        loss = F.cross_entropy(net(_augment(data[index], generator)), targets[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == steps:
            logger.info("judge step %d/%d loss %.4f (%.0f s)", step, steps, loss.item(), time.monotonic() - start)
        if max_seconds is not None and time.monotonic() - start > max_seconds:
            logger.warning("judge: time budget reached at step %d of %d", step, steps)
            break
    return net.eval()


def save_judge(net: ToyJudgeNet, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path),
              metadata={"classes": ",".join(CONCEPTS), "version": JUDGE_VERSION})
