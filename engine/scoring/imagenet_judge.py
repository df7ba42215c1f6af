"""The `imagenet` judge: an ImageNet-1k classifier, by default torchvision ResNet-50 IMAGENET1K_V2.

That is the original's judge, but concepts match by their exact class
indices (`judge_classes.imagenet`), never by label substrings, which scored chainsaw and English
springer spaniel 0% and counted planetariums as airliners. Preset `tiny` is a small random
classifier with 1000 outputs for offline tests.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import Field
from torch import nn

from engine.errors import UserError, unknown_choice
from engine.scoring.judge import ClassifierJudge, JudgeOptions, file_weights_id, hub_offline, local_weights_file

logger = logging.getLogger(__name__)

TINY_ARCH = "tiny"
TINY_IMAGE_SIZE = 32


def _is_file_reference(weights: str) -> bool:
    # torchvision weight names are enum members (IMAGENET1K_V2); anything path-like is a file.
    return "/" in weights or "\\" in weights or weights.endswith(".safetensors") or "." in Path(weights).name


def _classification_models() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def build_tiny_classifier() -> nn.Module:
    """Conv, pool, linear to 1000 logits: a stand-in with the real output space."""
    return nn.Sequential(
        nn.Conv2d(3, 8, kernel_size=3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, ImagenetJudge.num_classes),
    )


def _weights_enum(arch: str, name: str):
    import torchvision

    enum = torchvision.models.get_model_weights(arch)
    if name not in enum.__members__:
        raise unknown_choice(f"torchvision weights of {arch}", name, enum.__members__)
    return enum[name]


def _cached_checkpoint(url: str) -> Path:
    """Where torch.hub keeps a downloaded checkpoint (load_state_dict_from_url's own rule)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


class ImagenetJudgeOptions(JudgeOptions):
    arch: str = Field("resnet50", description="torchvision classification model name, or tiny (random test model).")
    weights: str | None = Field(
        "IMAGENET1K_V2",
        description="torchvision weights name of arch, a local .safetensors file, or null = random weights (tests).",
    )
    seed: int = Field(0, description="Initialisation seed when weights is null.")


class ImagenetJudge(ClassifierJudge[ImagenetJudgeOptions]):
    name = "imagenet"
    classes_key = "imagenet"
    num_classes = 1000
    options_class = ImagenetJudgeOptions
    presets: ClassVar[dict[str, dict[str, Any]]] = {"tiny": {"arch": TINY_ARCH, "weights": None}}

    @classmethod
    def class_names(cls) -> list[str]:
        """ImageNet-1k's class names (torchvision's weights metadata: no download)."""
        import torchvision

        return list(torchvision.models.get_model_weights("resnet50").IMAGENET1K_V2.meta["categories"])

    @classmethod
    def check_available(cls, options: ImagenetJudgeOptions) -> None:
        if options.arch != TINY_ARCH and options.arch not in _classification_models():
            choices = [TINY_ARCH, *_classification_models()]
            raise unknown_choice("torchvision classification model", options.arch, choices)
        if options.weights is None:
            return
        if _is_file_reference(options.weights):
            local_weights_file(options.weights, f"imagenet judge ({options.arch})")
            return
        if options.arch == TINY_ARCH:
            raise UserError("imagenet judge: arch tiny has no published weights; give a .safetensors file or null")
        weights = _weights_enum(options.arch, options.weights)
        path = _cached_checkpoint(weights.url)
        if path.exists():
            return
        if hub_offline():
            raise UserError(
                f"imagenet judge weights {options.arch}/{options.weights} are not in the local cache ({path}) "
                "and HF_HUB_OFFLINE=1; download them once with network access"
            )
        logger.info("downloading %s to %s", weights.url, path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(weights.url, str(path), progress=False)
        except Exception as exc:  # noqa: BLE001 (any download error becomes one line)
            raise UserError(f"imagenet judge: could not download {weights.url} ({exc})") from None

    @property
    def model_id(self) -> str:
        options = self.options
        if options.weights is None:
            weights = f"random-seed{options.seed}"
        elif _is_file_reference(options.weights):
            weights = file_weights_id(Path(options.weights).expanduser())
        else:
            weights = _weights_enum(options.arch, options.weights).name  # an alias such as DEFAULT -> its real name
        return f"imagenet:{options.arch}/{weights}"

    def load(self) -> None:
        import torchvision
        from torchvision.transforms._presets import ImageClassification

        options = self.options
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(options.seed)
            if options.arch == TINY_ARCH:
                model = build_tiny_classifier()
            else:
                model = torchvision.models.get_model(options.arch, weights=None)
        if options.weights is not None and _is_file_reference(options.weights):
            from safetensors.torch import load_file

            model.load_state_dict(load_file(str(Path(options.weights).expanduser())))
        elif options.weights is not None:
            # torchvision publishes pickled .pth checkpoints only; weights_only=True is torch's
            # restricted unpickler, which loads tensors and cannot run code.
            state = _weights_enum(options.arch, options.weights).get_state_dict(progress=False, weights_only=True)
            model.load_state_dict(state)
        if options.arch == TINY_ARCH:
            self.transform = ImageClassification(crop_size=TINY_IMAGE_SIZE, resize_size=TINY_IMAGE_SIZE)
        else:
            # The weights' own preprocessing (ResNet-50 V2: resize 232, crop 224, ImageNet mean/std).
            default = torchvision.models.get_model_weights(options.arch).DEFAULT
            self.transform = (
                _weights_enum(options.arch, options.weights).transforms()
                if options.weights is not None and not _is_file_reference(options.weights)
                else default.transforms()
            )
        self.model = model.to(self.device).eval()
        logger.info("imagenet judge loaded: %s on %s", self.model_id, self.device)

    @torch.no_grad()
    def probabilities(self, images: list[np.ndarray]) -> np.ndarray:
        self.ensure_loaded()
        if not images:
            return np.zeros((0, self.num_classes), dtype=np.float32)
        # ImageClassification takes uint8 CHW tensors and converts to float itself.
        # np.array copies: decoded PNGs are read-only arrays, which torch refuses to wrap.
        tensors = [torch.from_numpy(np.array(image)).permute(2, 0, 1) for image in images]
        batch = torch.stack([self.transform(t) for t in tensors])
        logits = self.model(batch.to(self.device)).float()
        return torch.softmax(logits, dim=-1).cpu().numpy()
