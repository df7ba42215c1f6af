"""The per-actor model cache: whole pipelines held least-recently-used under a byte budget, their
components shared by content.

- Every pipeline (a base model, an erased model, a UNet override on a base) is one entry. Entries
  are evicted whole, least recently used first, so the bytes held stay under `memory_budget`
  (engine.models.budget); an evicted entry's references are dropped, then gc and, on CUDA,
  `torch.cuda.empty_cache` give its memory back. No entry is kept for the life of the actor.
- Components (unet, vae, text_encoder, tokenizer) are held once per content identity
  (engine.models.sharing): a model whose text encoder and VAE equal a held one's loads only its
  UNet, and the shared components count once in the budget. A component is freed when the last
  entry using it is evicted.
- Every load and eviction is logged with its size; `stats` counts loads, evictions, components
  loaded and the peak bytes held (reported to the run's log and the manifest).

A model too large for the budget on its own is refused (UserError) after it loads; the driver
refuses what it can see before the run (engine.pipeline.footprint). Thread-safe: an actor may load
its first model in the background while Ray hands it the first unit.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import threading
from collections import Counter, OrderedDict
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from engine.errors import UserError

# Called through the module, so a test can replace a loader (and prove nothing loads).
from engine.models import loading
from engine.models.acceleration import accelerate_pipeline, compile_pipeline_unet
from engine.models.budget import format_bytes, module_bytes
from engine.models.sharing import SHARED_COMPONENTS, component_identities, folder_identity
from engine.specs.runs import ModelSpec

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

# Built-ins larger than this (sd14-random) are not hashed in memory (seconds per GB): their
# components are shared only between pipelines of the same source, as a UNet override shares its base's.
MEMORY_HASH_LIMIT = 256 * 10**6


@dataclass
class CacheStats:
    """What a cache did, for the manifest: pipelines loaded and evicted, components loaded (a shared
    one counts once), components taken from another pipeline, and the most bytes held at once."""

    loads: int = 0
    evictions: int = 0
    component_loads: int = 0
    components_shared: int = 0
    peak_bytes: int = 0
    budget_bytes: int | None = None
    loaded_models: list[str] = field(default_factory=list)  # in load order (a model evicted and loaded again twice)

    def record(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "loaded_models"}


@dataclass
class _Component:
    module: Any
    bytes: int
    users: int = 0


@dataclass
class _Entry:
    name: str
    pipe: Any
    components: list[str]  # keys into ModelCache._components


class ModelCache:
    """Pipelines for the models an actor serves, under a byte budget (None: unbounded)."""

    def __init__(self, device: torch.device, attention: str = "sdpa", memory_budget: int | None = None,
                 compile: bool = False, share: bool = True):
        self.device = device
        self.dtype = loading.dtype_for(device)
        self.attention = attention
        self.memory_budget = memory_budget
        self.compile = compile
        self.share = share
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._components: dict[str, _Component] = {}
        self.stats = CacheStats(budget_bytes=memory_budget)
        # Every component key ever loaded, with how often (the scale test checks shared ones load once).
        self.component_load_counts: Counter[str] = Counter()
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ reading

    def pipeline(self, spec: ModelSpec):
        with self._lock:
            key = spec.model_dump_json()
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key].pipe
            return self._load(key, spec)

    def held_bytes(self) -> int:
        with self._lock:
            return sum(c.bytes for c in self._components.values())

    def held_models(self) -> list[str]:
        with self._lock:
            return [e.name for e in self._entries.values()]

    def reserved_bytes(self) -> int:
        """Budget not used yet: what later loads may still take (batch_size auto keeps it free)."""
        if self.memory_budget is None:
            return 0
        return max(0, self.memory_budget - self.held_bytes())

    # ------------------------------------------------------------------ loading

    def _load(self, key: str, spec: ModelSpec):
        identities = self._identities(spec)
        reuse = {name: self._components[k].module for name, k in identities.items() if k in self._components}
        unet_key = None
        if spec.unet is not None:
            unet_key = self._unet_key(spec)
            reuse.pop("unet", None)  # the base's UNet is not this pipeline's
            if unet_key in self._components:
                reuse["unet"] = self._components[unet_key].module
        logger.info("loading %s on %s (%s)%s", spec.name, self.device, self.dtype,
                    f", sharing {', '.join(sorted(reuse))}" if reuse else "")
        pipe = self._build(spec, reuse)
        keys = self._component_keys(spec, pipe, identities, unet_key)
        pipe = self._swap_in_held(pipe, keys)
        new = {name: k for name, k in keys.items() if k not in self._components}
        new_bytes = {k: module_bytes(getattr(pipe, name)) for name, k in new.items()}
        total = sum(self._components[k].bytes for k in set(keys.values()) if k in self._components)
        total += sum(new_bytes.values())
        if self.memory_budget is not None and total > self.memory_budget:
            raise UserError(f"model {spec.name} needs {format_bytes(total)}, more than model_memory "
                            f"({format_bytes(self.memory_budget)}) holds; raise model_memory")
        self._make_room(sum(new_bytes.values()), keep=set(keys.values()))
        try:
            pipe = pipe.to(self.device)
            pipe.set_progress_bar_config(disable=True)
            loading.set_attention(pipe, self.attention, self.device)
            accelerate_pipeline(pipe, self.device)
        except BaseException:
            self._drop_unused()  # shared components kept for this pipeline, now used by none
            raise
        for name, k in keys.items():
            if k not in self._components:
                self._components[k] = _Component(getattr(pipe, name), new_bytes[k])
                self.component_load_counts[k] += 1
                self.stats.component_loads += 1
            else:
                self.stats.components_shared += 1
            self._components[k].users += 1
        if self.compile:
            compile_pipeline_unet(pipe)  # after registering: the held UNet stays the plain module
        self._entries[key] = _Entry(spec.name, pipe, list(keys.values()))
        self.stats.loads += 1
        self.stats.loaded_models.append(spec.name)
        held = self.held_bytes()
        self.stats.peak_bytes = max(self.stats.peak_bytes, held)
        logger.info("loaded %s: %s new (%d of %d components shared); cache holds %s in %d pipeline(s)%s",
                    spec.name, format_bytes(sum(new_bytes.values())), len(keys) - len(new), len(keys),
                    format_bytes(held), len(self._entries),
                    f" of {format_bytes(self.memory_budget)}" if self.memory_budget else "")
        return pipe

    def _build(self, spec: ModelSpec, reuse: dict[str, Any]):
        unet = None
        if spec.unet is not None and "unet" not in reuse and _is_unet_folder(spec.unet):
            # Loaded first and handed to the base's loader, so the base's own UNet never loads.
            unet = loading.load_unet(spec.unet, None, spec.allow_pickle, self.dtype)
            reuse = {**reuse, "unet": unet}
        pipe = (loading.load_base_pipeline(spec.pretrained, spec.revision, spec.allow_pickle, self.dtype, reuse=reuse)
                if reuse else loading.load_base_pipeline(spec.pretrained, spec.revision, spec.allow_pickle, self.dtype))
        differing = {name: module for name, module in reuse.items() if getattr(pipe, name) is not module}
        if differing:  # a built-in was built whole: the held (or override) components replace its own
            pipe = type(pipe)(**{**pipe.components, **differing})
        if spec.unet is not None and "unet" not in reuse:
            # A state-dict file: shaped like the base's UNet, which is dropped for it.
            unet = loading.load_unet(spec.unet, pipe.unet, spec.allow_pickle, self.dtype)
            pipe = type(pipe)(**{**pipe.components, "unet": unet})
        return pipe

    def _identities(self, spec: ModelSpec) -> dict[str, str]:
        """Content keys of the components a source's files hold (none for a built-in: those are
        identified from their tensors once built)."""
        if not self.share:
            return {}
        folder = loading.pipeline_folder(spec.pretrained, spec.revision)
        if folder is None:
            return {}
        return {name: f"{identity}|{self.dtype}" for name, identity in
                component_identities(folder, spec.allow_pickle).items()}

    def _unet_key(self, spec: ModelSpec) -> str:
        if spec.unet is None:
            raise ValueError(f"model {spec.name!r} has no UNet override to key")
        if not self.share:
            return f"unet-override:{spec.unet}|{self.dtype}"
        return f"{folder_identity(spec.unet, spec.allow_pickle)}|{self.dtype}"

    def _component_keys(self, spec: ModelSpec, pipe, identities: dict[str, str],
                        unet_key: str | None) -> dict[str, str]:
        """A key for each shareable component of `pipe`: its content identity, else one computed
        from its tensors (built-ins), else one that only this source and revision share."""
        keys = {}
        for name in SHARED_COMPONENTS:
            component = getattr(pipe, name, None)
            if component is None:
                continue
            if name == "unet" and unet_key is not None:
                keys[name] = unet_key
            elif name in identities:
                keys[name] = identities[name]
            elif self.share and module_bytes(component) <= MEMORY_HASH_LIMIT:
                keys[name] = f"{memory_identity(component)}|{self.dtype}"
            else:
                keys[name] = f"{spec.pretrained}@{spec.revision}:{name}|{self.dtype}"
        return keys

    def _swap_in_held(self, pipe, keys: dict[str, str]):
        """Components built again although held (built-ins) are replaced by the held ones."""
        swaps = {name: self._components[k].module for name, k in keys.items()
                 if k in self._components and getattr(pipe, name) is not self._components[k].module}
        return type(pipe)(**{**pipe.components, **swaps}) if swaps else pipe

    # ------------------------------------------------------------------ evicting

    def _make_room(self, incoming: int, keep: set[str]) -> None:
        """Evict least recently used pipelines until `incoming` more bytes fit. Components in `keep`
        (the incoming pipeline's shared ones) stay, whoever else used them."""
        if self.memory_budget is None:
            return
        evicted = False
        while self._entries and self.held_bytes() + incoming > self.memory_budget:
            self._evict_oldest(keep)
            evicted = True
        if evicted:
            release_device_memory(self.device)

    def _evict_oldest(self, keep: set[str]) -> None:
        _, entry = self._entries.popitem(last=False)
        freed = 0
        for k in entry.components:
            component = self._components[k]
            component.users -= 1
            if component.users == 0 and k not in keep:
                freed += component.bytes
                del self._components[k]
        self.stats.evictions += 1
        logger.info("evicted %s: freed %s; cache holds %s in %d pipeline(s)", entry.name, format_bytes(freed),
                    format_bytes(self.held_bytes()), len(self._entries))

    def _drop_unused(self) -> None:
        for k in [k for k, c in self._components.items() if c.users == 0]:
            del self._components[k]
        release_device_memory(self.device)

    def clear(self) -> None:
        with self._lock:
            while self._entries:
                self._evict_oldest(set())
            release_device_memory(self.device)


def _is_unet_folder(path: str) -> bool:
    from pathlib import Path

    return Path(path).is_dir()


def memory_identity(module) -> str:
    """A content hash of a loaded component: its class and config, and every tensor's name, dtype,
    shape and bytes (a tokenizer: its vocabulary). For built-ins, which have no files."""
    digest = hashlib.sha256(type(module).__qualname__.encode())
    config = getattr(module, "config", None)
    if config is not None:
        digest.update(repr(sorted(dict(config).items()) if hasattr(config, "items") else config.to_dict()).encode())
    if hasattr(module, "state_dict"):
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(dtype=_byte_dtype()).numpy().tobytes())
    elif hasattr(module, "get_vocab"):
        digest.update(repr(sorted(module.get_vocab().items())).encode())
        digest.update(str(getattr(module, "model_max_length", "")).encode())
    return f"mem:{digest.hexdigest()}"


def _byte_dtype():
    import torch

    return torch.uint8


def release_device_memory(device: torch.device) -> None:
    """Give an evicted pipeline's memory back: collect its cycles, then empty the CUDA cache."""
    gc.collect()
    if device.type == "cuda":
        import torch

        torch.cuda.empty_cache()
