"""The `toy` judge: a small CNN that tells the 8 toy shapes apart, trained on the renderer.

It is independent of the diffusion model (trained on rendered images only, never on generated
ones), so it can judge what the model draws. Class index i is `render.CONCEPTS[i]`; the toy concept
configs name these indices under `judge_classes: {toy: [i]}`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

from engine.toyworld.render import CONCEPTS

logger = logging.getLogger(__name__)

JUDGE_NAME = "toy"
JUDGE_VERSION = "toy-judge-v1"
WEIGHTS_FILE = Path(__file__).resolve().parent / "weights" / "judge.safetensors"


class ToyJudgeNet(nn.Module):
    """5 conv + BN + ReLU, 2 max-pools, global average pool, linear (141 k parameters)."""

    def __init__(self, num_classes: int = len(CONCEPTS), width: int = 32):
        super().__init__()
        channels = [3, width, width, 2 * width, 2 * width, 4 * width]
        layers: list[nn.Module] = []
        for index in range(5):
            layers += [nn.Conv2d(channels[index], channels[index + 1], 3, padding=1),
                       nn.BatchNorm2d(channels[index + 1]), nn.ReLU()]
            if index in (1, 3):
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels[-1], num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: float N x 3 x H x W in [-1, 1] -> logits."""
        return self.head(self.features(images).mean(dim=(2, 3)))


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 N x H x W x 3 -> float N x 3 x H x W in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


@torch.no_grad()
def predict_probs(net: ToyJudgeNet, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    device = next(net.parameters()).device
    out = []
    for start in range(0, len(images), batch_size):
        batch = to_tensor(images[start:start + batch_size]).to(device)
        out.append(F.softmax(net(batch).float(), dim=-1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, len(CONCEPTS)), dtype=np.float32)


class ToyJudge:
    """The shipped toy judge: `classify(uint8 N x H x W x 3) -> float32 N x 8 probabilities`."""

    name = JUDGE_NAME
    version = JUDGE_VERSION
    classes: tuple[str, ...] = CONCEPTS

    def __init__(self, net: ToyJudgeNet):
        self.net = net.eval()

    def classify(self, images: np.ndarray | list[np.ndarray]) -> np.ndarray:
        if isinstance(images, list):
            # One batch may mix sizes (whole images and inpainting's cropped mask regions).
            images = np.stack([_judge_size(np.asarray(image)[None])[0] for image in images])
        return predict_probs(self.net, _judge_size(np.asarray(images)))


def _judge_size(images: np.ndarray) -> np.ndarray:
    """uint8 N x H x W x 3 at 32 x 32: probes may ask for other sizes; the judge was trained at 32."""
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"toy judge expects uint8 N x H x W x 3 images, got {images.dtype} {images.shape}")
    if images.shape[1:3] == (32, 32):
        return images
    tensor = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    tensor = F.interpolate(tensor, size=(32, 32), mode="area")
    return tensor.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


def load_toy_judge(device: str | torch.device = "cpu", path: Path = WEIGHTS_FILE) -> ToyJudge:
    if not Path(path).exists():
        raise FileNotFoundError(f"toy judge weights not found at {path}; run `engine toyworld build`")
    net = ToyJudgeNet()
    net.load_state_dict(load_file(str(path)))
    return ToyJudge(net.to(device))
