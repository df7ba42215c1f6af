"""PNG encoding of a unit's images on a small thread pool. Pillow releases the GIL while zlib
compresses, so a GPU actor's 512x512 images (tens of milliseconds each, more for the noise-like
images of random weights) and a best-of-N unit's candidates encode side by side instead of one
after another. The bytes are those of engine.results.encode_png, image by image."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from engine.results import encode_png

MAX_THREADS = 8
_pool: ThreadPoolExecutor | None = None
_lock = threading.Lock()


def encode_pngs(images: list[np.ndarray]) -> list[bytes]:
    if len(images) <= 1:
        return [encode_png(image) for image in images]
    return list(_shared_pool().map(encode_png, images))


def _shared_pool() -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=min(MAX_THREADS, os.cpu_count() or 1), thread_name_prefix="png")
        return _pool
