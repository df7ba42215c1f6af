"""The `clip` judge: 100 x cosine(image embedding, concept text embedding) with open_clip.

Default ViT-B-32 with OpenAI weights, the original's CLIP (its
`logits_per_image` is 100 x cosine with CLIP's own preprocessing). The text is the concept's
`clip_text` ("a photo of a X", or "a painting in the style of X" for styles). Preset `tiny` is a
3 M-parameter random model (config tiny-clip.json shipped next to this file) for offline tests.
"""

from __future__ import annotations

import logging
from functools import cache
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from pydantic import Field

from engine.errors import UserError, unknown_choice
from engine.scoring.judge import Judge, JudgeOptions, file_weights_id, hub_offline, local_weights_file
from engine.specs.concepts import ConceptSpec

logger = logging.getLogger(__name__)

TINY_CONFIG = Path(__file__).resolve().parent / "tiny-clip.json"
TINY_MODEL = "tiny-clip"  # the model name TINY_CONFIG registers


@cache
def register_tiny_config() -> None:
    """Make open_clip know `tiny-clip`. The file stays in the package: open_clip rescans every
    registered path whenever a config is added, so a deleted temp file would drop the model."""
    import open_clip

    open_clip.add_model_config(TINY_CONFIG)


def _is_file_reference(pretrained: str) -> bool:
    # open_clip tags are bare identifiers (openai, laion2b_s34b_b79k); anything path-like is a file.
    return "/" in pretrained or "\\" in pretrained or pretrained.endswith((".safetensors", ".bin", ".pt", ".pth"))


class ClipJudgeOptions(JudgeOptions):
    model: str = Field("ViT-B-32", description="open_clip architecture, or tiny-clip (random test config).")
    pretrained: str | None = Field(
        "openai", description="open_clip pretrained tag, a local .safetensors file, or null = random weights (tests)."
    )
    seed: int = Field(0, description="Initialisation seed when pretrained is null.")


class ClipJudge(Judge[ClipJudgeOptions]):
    name = "clip"
    slot = "clip"
    options_class = ClipJudgeOptions
    presets: ClassVar[dict[str, dict[str, Any]]] = {"tiny": {"model": TINY_MODEL, "pretrained": None}}

    @classmethod
    def check_available(cls, options: ClipJudgeOptions) -> None:
        if options.model == TINY_MODEL and options.pretrained is None:
            return  # the shipped config with random weights: nothing to look up, no open_clip import (5 s)
        import open_clip

        register_tiny_config()
        if options.model not in open_clip.list_models():
            raise unknown_choice("open_clip model", options.model, open_clip.list_models())
        if options.pretrained is None:
            return
        if _is_file_reference(options.pretrained):
            local_weights_file(options.pretrained, f"clip judge ({options.model})")
            return
        config = open_clip.get_pretrained_cfg(options.model, options.pretrained)
        if not config:
            raise unknown_choice(
                f"pretrained tag of {options.model}",
                options.pretrained,
                open_clip.list_pretrained_tags_by_model(options.model),
            )
        # Downloads once when online (into the Hugging Face cache, which actors then read); offline
        # it only looks in the cache and fails at once.
        try:
            open_clip.download_pretrained(config)
        except Exception as exc:  # noqa: BLE001 (open_clip raises several types for missing weights)
            if hub_offline():
                why = "HF_HUB_OFFLINE=1 and they are not in the local Hugging Face cache; download them once online"
            else:
                why = f"the download failed ({str(exc).splitlines()[0][:200]})"
            raise UserError(f"CLIP weights {options.model}/{options.pretrained} are not available: {why}") from None

    @property
    def model_id(self) -> str:
        options = self.options
        if options.pretrained is None:
            weights = f"random-seed{options.seed}"
        elif _is_file_reference(options.pretrained):
            weights = file_weights_id(Path(options.pretrained).expanduser())
        else:
            weights = options.pretrained
        return f"clip:{options.model}/{weights}"

    def load(self) -> None:
        import open_clip

        register_tiny_config()
        options = self.options
        # Random weights are seeded so a test judge gives the same scores in every process.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(options.seed)
            model, _, preprocess = open_clip.create_model_and_transforms(
                options.model, pretrained=options.pretrained, device=self.device
            )
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(options.model)
        self._text_features: dict[str, torch.Tensor] = {}
        logger.info("clip judge loaded: %s on %s", self.model_id, self.device)

    @torch.no_grad()
    def _image_features(self, images: list[np.ndarray]) -> torch.Tensor:
        batch = torch.stack([self.preprocess(Image.fromarray(image)) for image in images]).to(self.device)
        features = self.model.encode_image(batch).float()
        return features / features.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def _text_feature(self, text: str) -> torch.Tensor:
        if text not in self._text_features:
            features = self.model.encode_text(self.tokenizer([text]).to(self.device)).float()
            self._text_features[text] = (features / features.norm(dim=-1, keepdim=True))[0]
        return self._text_features[text]

    def _similarities(self, images: list[np.ndarray], texts: list[str]) -> list[float]:
        self.ensure_loaded()
        image_features = self._image_features(images)
        text_features = torch.stack([self._text_feature(text) for text in texts])
        return (100.0 * (image_features * text_features).sum(dim=-1)).cpu().tolist()

    def score(self, images: list[np.ndarray], concepts: list[ConceptSpec]) -> dict[str, list]:
        if not images:
            return {"clip_score": []}
        return {"clip_score": self._similarities(images, [c.clip_text for c in concepts])}

    def concept_scores(self, images: list[np.ndarray], concept: ConceptSpec) -> list[float]:
        return self._similarities(images, [concept.clip_text] * len(images)) if images else []

    @torch.no_grad()
    def member_rankings(
        self, images: list[np.ndarray], concepts: list[ConceptSpec]
    ) -> list[tuple[list[int], list[float]]]:
        """Per image, its top 5 among the members of its concept's set (indices into
        `set_members(concept)`, the set's configured concepts by name), with softmax(100 x cosine)
        probabilities over the set: what the image shows, when no classifier judge ranks it."""
        from engine.scoring.judge import top5_rankings

        if not images:
            return []
        self.ensure_loaded()
        features = self._image_features(images)
        rankings = []
        for feature, concept in zip(features, concepts, strict=True):
            texts = torch.stack([self._text_feature(member.clip_text) for member in set_members(concept)])
            probs = torch.softmax(100.0 * texts @ feature, dim=-1).cpu().numpy()
            rankings.extend(top5_rankings(probs[None]))
        return rankings


def set_members(concept: ConceptSpec) -> list[ConceptSpec]:
    """The concepts of `concept`'s set, by name: the classes a CLIP judge ranks an image among."""
    from engine.specs.concepts import concept_set_members

    return list(concept_set_members(concept).values())
