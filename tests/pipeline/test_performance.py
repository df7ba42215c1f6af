"""Speed features, checked for what they must not change: prompt-embedding cache, light start-up,
GPU settings (applied on CPU tensors where they can be), auto batch size, background Ray start."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import sampling
from engine.models.acceleration import accelerate_pipeline, chunk_vae_decode, is_compiled
from engine.models.builtin import build_tiny
from engine.models.cache import ModelCache
from engine.pipeline.batching import (
    AutoBatcher,
    batching_record,
    largest_fitting_batch,
    unit_rows,
)
from engine.pipeline.encoding import encode_pngs
from engine.pipeline.ray_start import RayStart, worker_env
from engine.probe import ProbeBatch, ProbeContext, WorkRow, row_generator, to_uint8
from engine.results import encode_png
from engine.specs.runs import ModelSpec, run_spec_from_dict
from probes.standard_prompt import StandardPromptParams, StandardPromptProbe

ROOT = Path(__file__).resolve().parents[2]


def _encoder_calls(pipe) -> list[int]:
    calls: list[int] = []
    pipe.text_encoder.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    return calls


# --------------------------------------------------------------------------- prompt embeddings


def test_prompt_embeddings_equal_the_pipelines_and_encode_each_prompt_once():
    pipe = build_tiny()
    calls = _encoder_calls(pipe)
    prompts = ["a cached church", "a cached church", "a cached tench", "a cached church"]
    cached = sampling.prompt_embeddings(pipe, prompts)
    assert calls == [1, 1]  # two distinct prompts, each encoded alone
    expected, _ = pipe.encode_prompt(prompts, device=pipe.device, num_images_per_prompt=1,
                                     do_classifier_free_guidance=False)
    torch.testing.assert_close(cached, expected, rtol=0, atol=1e-6)
    calls.clear()
    again = sampling.prompt_embeddings(pipe, prompts[:2])
    assert calls == [] and torch.equal(again, cached[:2])  # served from the cache


def test_prompt_embeddings_follow_in_place_weight_changes():
    pipe = build_tiny()
    before = sampling.prompt_embeddings(pipe, ["a changing prompt"])
    weight = pipe.text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        weight.mul_(2.0)
    after = sampling.prompt_embeddings(pipe, ["a changing prompt"])
    assert not torch.equal(before, after)


def test_cfg_embeddings_stack_the_negative_prompt_first():
    pipe = build_tiny()
    both = sampling.encode_prompts(pipe, ["a stacked prompt"] * 2, "", 7.5)
    assert both.shape[0] == 4
    torch.testing.assert_close(both[:2], sampling.prompt_embeddings(pipe, ["", ""]), rtol=0, atol=0)
    assert sampling.encode_prompts(pipe, ["a stacked prompt"], "", 1.0).shape[0] == 1


def test_standard_prompt_images_equal_the_pipelines_own_prompt_path(tiny_pipe, tmp_path):
    rows = [WorkRow(f"r{i}", "tiny", "none", "church", "church", "standard_prompt", "{}", prompt, i, seed)
            for i, (prompt, seed) in enumerate([("a picture of a church", 11), ("a picture of a church", 12),
                                                 ("a picture of a tench", 13)])]
    params = StandardPromptParams(num_inference_steps=2)
    context = ProbeContext(tiny_pipe.device, lambda: tiny_pipe, lambda name: None, tmp_path)
    output = StandardPromptProbe().run(ProbeBatch(rows, params, tiny_pipe, context))
    with torch.no_grad():
        reference = tiny_pipe(prompt=[r.prompt for r in rows], generator=[row_generator(r.seed) for r in rows],
                              num_inference_steps=2, guidance_scale=7.5, output_type="np").images
    # Byte-identical on CPU; a different CPU's kernels could differ in the last bit of a float.
    assert np.abs(np.stack(output.images).astype(int) - np.stack(to_uint8(reference))).max() <= 1


def test_pooled_png_encoding_gives_the_same_bytes_in_order():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (16 + i, 24, 3), dtype=np.uint8) for i in range(5)]
    assert encode_pngs(images) == [encode_png(image) for image in images]
    assert encode_pngs(images[:1]) == [encode_png(images[0])] and encode_pngs([]) == []


# --------------------------------------------------------------------------- start-up


LIGHT_CHECK = """
import sys
from typer.testing import CliRunner
from engine.cli import app
result = CliRunner().invoke(app, sys.argv[1:])
heavy = sorted(m for m in ("torch", "diffusers", "transformers", "ray") if m in sys.modules)
print(result.exit_code, heavy, result.output.strip().splitlines()[-1])
"""


@pytest.mark.parametrize("flags,message", [
    (["--model", "tiny", "--concept", "nope"], "unknown concept 'nope'"),
    (["--model", "nope", "--concept", "church"], "unknown model 'nope'"),
    (["--model", "tiny", "--concept", "church", "--set", "batch_size=0"], "batch_size"),
])
def test_bad_run_input_is_rejected_before_heavy_imports(flags, message, tmp_path):
    args = ["run", *flags, "--probe", "standard_prompt", "--num-images", "1", "--output", str(tmp_path / "x")]
    done = subprocess.run([sys.executable, "-c", LIGHT_CHECK, *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    code, heavy, last_line = done.stdout.strip().split(" ", 2)
    assert code == "2" and message in last_line, done.stdout + done.stderr
    assert heavy == "[]", f"imported before the error: {heavy}"


# --------------------------------------------------------------------------- GPU settings


def test_cpu_pipelines_get_no_gpu_settings():
    pipe = build_tiny()
    assert accelerate_pipeline(pipe, torch.device("cpu")) == []
    assert not pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert not hasattr(pipe.vae, "_engine_decode_chunk")


def test_cuda_settings_channels_last_and_chunked_vae_decode():
    # Applied to CPU tensors: memory format and decode chunking do not need a GPU to be checked.
    pipe = build_tiny()
    latents = torch.randn(11, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = pipe.vae.decode(latents, return_dict=False)[0]
    applied = accelerate_pipeline(pipe, torch.device("cuda"))
    assert "channels_last" in applied and any(a.startswith("vae_decode_chunk") for a in applied)
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    sizes = []
    pipe.vae.decoder.register_forward_hook(lambda module, args, output: sizes.append(args[0].shape[0]))
    with torch.no_grad():
        chunked = pipe.vae.decode(latents).sample
    assert sizes == [8, 3]
    torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-4)


def test_chunked_decode_is_applied_once():
    pipe = build_tiny()
    chunk_vae_decode(pipe.vae, 4)
    first = pipe.vae.decode
    chunk_vae_decode(pipe.vae, 4)
    assert pipe.vae.decode is first


def test_compile_flag_reaches_the_unet(tmp_path):
    spec = run_spec_from_dict({"output": str(tmp_path), "concepts": ["church"], "probes": ["standard_prompt"],
                               "num_images": 1, "compile": True}, "test")
    assert spec.compile is True
    assert run_spec_from_dict({"output": "o", "concepts": ["church"], "probes": ["standard_prompt"],
                               "num_images": 1}, "test").compile is False
    cache = ModelCache(torch.device("cpu"), compile=True)
    base = cache.pipeline(ModelSpec(name="tiny", pretrained="tiny"))
    assert is_compiled(base.unet)  # wrapped; inductor compiles at the first call


@pytest.mark.slow
def test_compiled_unet_generates_like_the_eager_one(tiny_pipe):
    eager = build_tiny()
    compiled = build_tiny()
    accelerate_pipeline(compiled, torch.device("cpu"), compile_unet=True)
    kwargs = {"prompt": ["a compiled church"], "num_inference_steps": 1, "output_type": "np"}
    with torch.no_grad():
        a = eager(generator=row_generator(3), **kwargs).images
        b = compiled(generator=row_generator(3), **kwargs).images
    assert np.abs(a - b).max() < 1 / 255


# --------------------------------------------------------------------------- batch size


def test_auto_batch_size_on_cpu_is_a_fixed_default():
    assert unit_rows("auto", on_gpu=False) == 4
    assert unit_rows("auto", on_gpu=True) == 64
    assert unit_rows(6, on_gpu=True) == 6
    rows = list(range(10))
    assert AutoBatcher(True, torch.device("cpu")).split(rows, "m", None, {}) == [rows]
    assert AutoBatcher(False, torch.device("cuda")).split(rows, "m", None, {}) == [rows]


def test_largest_fitting_batch_doubles_until_the_next_size_would_not_fit():
    tried = []

    def memory(rows: int) -> int:
        tried.append(rows)
        return 100 + 30 * rows

    assert largest_fitting_batch(memory, budget=1000, cap=64)[0] == 16
    assert tried == [1, 2, 4, 8, 16]  # 32 would need 1060
    assert largest_fitting_batch(memory, budget=10**9, cap=64)[0] == 64
    assert largest_fitting_batch(memory, budget=50, cap=64)[0] == 1  # nothing smaller exists


def test_largest_fitting_batch_stops_at_out_of_memory():
    def memory(rows: int) -> int:
        if rows >= 8:
            raise MemoryError
        return rows

    size, peaks = largest_fitting_batch(memory, budget=10**9, cap=64)
    assert size == 4 and sorted(peaks) == [1, 2, 4]


def test_auto_batcher_measures_once_per_model_and_size_and_reports_it():
    measured, reported = [], []

    def measure(pipe, height, width, guidance_scale):
        measured.append((height, width, guidance_scale))
        return {"batch_size": 4, "peak_bytes": {"1": 10}}

    batcher = AutoBatcher(True, torch.device("cuda"), reported.append, measure=measure)
    rows = list(range(10))
    assert [len(b) for b in batcher.split(rows, "m", None, {"guidance_scale": 7.5})] == [4, 4, 2]
    assert [len(b) for b in batcher.split(rows[:5], "m", None, {"guidance_scale": 7.5})] == [4, 1]
    batcher.split(rows, "m", None, {"height": 32, "width": 32, "guidance_scale": 7.5})
    assert measured == [(None, None, 7.5), (32, 32, 7.5)]
    record = batching_record("auto", True, reported)
    assert record["unit_rows"] == 64 and len(record["measured"]) == 2
    assert {m["model"] for m in record["measured"]} == {"m"} and {m["batch_size"] for m in record["measured"]} == {4}
    assert [(m["height"], m["width"]) for m in record["measured"]] == [(None, None), (32, 32)]
    assert batching_record(8, True, reported) == {"batch_size": 8, "unit_rows": 8}


# --------------------------------------------------------------------------- Ray start


def test_background_start_hands_over_ray_and_its_errors():
    started = []
    start = RayStart("somewhere", init=started.append)
    ray = start.ready()
    assert started == ["somewhere"] and ray.__name__ == "ray"
    assert start._thread.is_alive()  # kept alive: Ray's children die with the thread that spawned them
    start.close()
    assert not start._thread.is_alive()

    def fail(cluster):
        raise ConnectionError("no cluster at " + cluster)

    failing = RayStart("nowhere", init=fail)
    with pytest.raises(ConnectionError, match="no cluster at nowhere"):
        failing.ready()
    failing.close()


def test_workers_wait_passively_unless_told_otherwise(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert worker_env()["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert worker_env()["OMP_WAIT_POLICY"] == "ACTIVE"


def test_run_spec_batch_size_accepts_auto_and_positive_integers():
    base = {"output": "o", "concepts": ["church"], "probes": ["standard_prompt"], "num_images": 1}
    assert run_spec_from_dict(base, "t").batch_size == "auto"
    assert run_spec_from_dict({**base, "batch_size": 3}, "t").batch_size == 3
    assert json.loads(run_spec_from_dict({**base, "batch_size": "auto"}, "t").model_dump_json())["batch_size"] == "auto"
