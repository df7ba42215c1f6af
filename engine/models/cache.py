"""The per-actor model cache: base components loaded once per source, erased UNets swapped in."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING

# Called through the module, so a test can replace a loader (and prove nothing loads).
from engine.models import loading
from engine.models.acceleration import accelerate_pipeline, compile_pipeline_unet
from engine.specs.runs import ModelSpec

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


class ModelCache:
    """Pipelines for the models an actor serves. Base components are loaded once per source; a
    UNet override shares everything else with its base. Least recently used UNets are dropped
    beyond `max_unets` so a long grid does not fill GPU memory. Thread-safe: an actor may load its
    first model in the background while Ray hands it the first unit."""

    def __init__(self, device: torch.device, attention: str = "sdpa", max_unets: int = 3, compile: bool = False):
        self.device = device
        self.dtype = loading.dtype_for(device)
        self.attention = attention
        self.max_unets = max_unets
        self.compile = compile
        self._bases: dict[tuple, object] = {}
        self._pipelines: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.RLock()

    def pipeline(self, spec: ModelSpec):
        with self._lock:
            return self._pipeline(spec)

    def _pipeline(self, spec: ModelSpec):
        key = spec.model_dump_json()
        if key in self._pipelines:
            self._pipelines.move_to_end(key)
            return self._pipelines[key]
        base = self._base(spec)
        if spec.unet is None:
            pipe = base
        else:
            unet = loading.load_unet(spec.unet, base.unet, spec.allow_pickle, self.dtype).to(self.device)
            pipe = type(base)(**{**base.components, "unet": unet})
            loading.set_attention(pipe, self.attention, self.device)
            accelerate_pipeline(pipe, self.device)
            if self.compile:
                compile_pipeline_unet(pipe)
        pipe.set_progress_bar_config(disable=True)
        self._pipelines[key] = pipe
        while len(self._pipelines) > self.max_unets:
            self._pipelines.popitem(last=False)
        return pipe

    def _base(self, spec: ModelSpec):
        key = (spec.pretrained, spec.revision)
        if key not in self._bases:
            logger.info("loading %s on %s (%s)", spec.pretrained, self.device, self.dtype)
            pipe = loading.load_base_pipeline(spec.pretrained, spec.revision, spec.allow_pickle, self.dtype)
            pipe = pipe.to(self.device)
            pipe.set_progress_bar_config(disable=True)
            loading.set_attention(pipe, self.attention, self.device)
            accelerate_pipeline(pipe, self.device, compile_unet=self.compile)
            self._bases[key] = pipe
        return self._bases[key]
