"""The few places the engine reads a dependency's internals, checked against the installed version.

When one of these fails after a dependency update (constraints.txt), the engine's code that relies
on it must change with it: the failure message names the module and what to update. Each check is
on the installed package itself, not a copy of its behaviour.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path

import pytest

from engine.pipeline.raynoise import RAY_NOISE, RAY_NOISY_LOGGERS


def _ray_texts() -> list[bytes]:
    """Ray's Python sources (adjacent string literals joined, as Python joins them) and its core
    library (the C++ core worker logs one of the messages)."""
    root = Path(importlib.util.find_spec("ray").origin).parent
    sources = [re.sub(rb"[\"']\s*\n\s*[\"']", b"", path.read_bytes()) for path in root.rglob("*.py")]
    return [*sources, *(path.read_bytes() for path in root.glob("_raylet*.so"))]


@pytest.mark.parametrize("marker", RAY_NOISE)
def test_every_ray_message_the_engine_filters_is_still_written_by_ray(marker):
    """engine/pipeline/raynoise.py drops Ray's lines by these texts; a reworded message would pass
    the filter and reach users again."""
    needle = marker.encode()
    assert any(needle in text for text in _ray_texts()), (
        f"Ray no longer writes {marker!r}: update RAY_NOISE in engine/pipeline/raynoise.py")


@pytest.mark.parametrize("name", RAY_NOISY_LOGGERS)
def test_the_loggers_the_engine_filters_are_ray_modules(name):
    assert importlib.util.find_spec(name) is not None, (
        f"{name} is gone from Ray: update RAY_NOISY_LOGGERS in engine/pipeline/raynoise.py")


def test_pyarrow_pickles_s3_options_as_the_lock_reads_them():
    """engine/lock.py's _s3_options reads the S3FileSystem's resolved options from its pickle
    arguments, to point boto3 at the same server for the conditional lock write."""
    from pyarrow.fs import S3FileSystem

    from engine.lock import _s3_options

    class Location:
        fs = S3FileSystem(endpoint_override="127.0.0.1:9", scheme="http", region="eu-test-1", anonymous=True)

    options = _s3_options(Location())
    assert options.get("endpoint_override") == "127.0.0.1:9" and options.get("scheme") == "http", (
        "pyarrow's S3FileSystem pickle layout changed: update _s3_options in engine/lock.py")
    assert options.get("region") == "eu-test-1"


def test_diffusers_model_config_is_the_internal_dict_inpainting_restores(tiny_pipe):
    """probes/inpainting.py saves `unet._internal_dict` before building an inpainting pipeline (which
    may rewrite an old checkpoint's config in place) and assigns it back; `config` must read it."""
    from diffusers.configuration_utils import FrozenDict

    unet = tiny_pipe.unet
    saved = unet._internal_dict
    assert unet.config is saved, "diffusers' ModelMixin.config is no longer _internal_dict: update inpainting"
    try:
        unet._internal_dict = FrozenDict({**saved, "sample_size": 7})
        assert unet.config["sample_size"] == 7
    finally:
        unet._internal_dict = saved
    assert unet.config is saved
