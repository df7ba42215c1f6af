"""The `toy` judge in the engine's judge registry: the toy-world shape classifier as a ClassifierJudge.

Concepts name their class indices under `judge_classes: {toy: [i]}` (configs/concepts/toy_*.yaml);
index i is `engine.toyworld.render.CONCEPTS[i]`. The weights are the shipped
engine/toyworld/weights/judge.safetensors unless `weights` names another safetensors file.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from pydantic import Field

from engine.errors import UserError
from engine.scoring.judge import ClassifierJudge, JudgeOptions, file_weights_id, local_weights_file
from engine.toyworld.judge import JUDGE_VERSION, WEIGHTS_FILE, load_toy_judge
from engine.toyworld.render import CONCEPTS

logger = logging.getLogger(__name__)


class ToyJudgeOptions(JudgeOptions):
    weights: str | None = Field(None, description="A .safetensors file of the toy judge; null = the shipped one.")


class ToyClassifierJudge(ClassifierJudge[ToyJudgeOptions]):
    name = "toy"
    classes_key = "toy"
    num_classes = len(CONCEPTS)
    options_class = ToyJudgeOptions

    @classmethod
    def class_names(cls) -> list[str]:
        return list(CONCEPTS)

    @staticmethod
    def _weights_path(options: ToyJudgeOptions) -> Path:
        return Path(options.weights).expanduser() if options.weights else WEIGHTS_FILE

    @classmethod
    def check_available(cls, options: ToyJudgeOptions) -> None:
        if options.weights:
            local_weights_file(options.weights, "toy judge")
        elif not WEIGHTS_FILE.exists():
            raise UserError(f"toy judge weights missing ({WEIGHTS_FILE}); run `engine toyworld build`")

    @property
    def model_id(self) -> str:
        return f"toy:{JUDGE_VERSION}/{file_weights_id(self._weights_path(self.options))}"

    def load(self) -> None:
        self.judge = load_toy_judge(self.device, self._weights_path(self.options))
        logger.info("toy judge loaded: %s on %s", self.model_id, self.device)

    def probabilities(self, images: list[np.ndarray]) -> np.ndarray:
        self.ensure_loaded()
        if not images:
            return np.zeros((0, self.num_classes), dtype=np.float32)
        return self.judge.classify(images)
