"""Speed settings applied to a loaded pipeline in a probe actor: what the GPU wants, nothing on CPU
unless asked.

- fp16 weights and torch SDPA attention are chosen where the pipeline is loaded (engine.models.loading).
- channels_last (CUDA only): cuDNN's fastest convolutions for fp16 take NHWC tensors; on CPU the
  NCHW layout stays, so CPU images are unchanged.
- VAE decode in fixed chunks (CUDA only): a large generation batch would otherwise decode all its
  images at once, and the VAE's 512x512 activations are what runs out of memory first. The chunk
  size is fixed, so a row's pixels never depend on how many rows its unit had beyond the chunk.
- torch.compile of the UNet (the run file's `compile: true`, off by default): the first call of
  each batch shape compiles (minutes on a GPU for SD 1.4), later calls are faster.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

VAE_DECODE_CHUNK = 8


def accelerate_pipeline(pipe, device: torch.device, compile_unet: bool = False) -> list[str]:
    """Apply the speed settings for `device` to `pipe` in place; returns what was applied."""
    applied = []
    if device.type == "cuda":
        import torch

        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
        applied.append("channels_last")
        chunk_vae_decode(pipe.vae, VAE_DECODE_CHUNK)
        applied.append(f"vae_decode_chunk={VAE_DECODE_CHUNK}")
    if compile_unet:
        compile_pipeline_unet(pipe)
        applied.append("compile_unet")
    if applied:
        logger.info("pipeline speed settings: %s", ", ".join(applied))
    return applied


def compile_pipeline_unet(pipe) -> None:
    """torch.compile the UNet once (a compiled UNet is left as it is)."""
    import torch

    if not is_compiled(pipe.unet):
        # Default inductor mode: no CUDA graphs, so a smaller last unit recompiles once instead of
        # capturing a graph per shape; max-autotune would add minutes per shape for a few percent.
        pipe.unet = torch.compile(pipe.unet)


def is_compiled(module) -> bool:
    return hasattr(module, "_orig_mod")


def chunk_vae_decode(vae, chunk: int) -> None:
    """Make `vae.decode` decode at most `chunk` latents per call (results concatenated)."""
    if getattr(vae, "_engine_decode_chunk", None) is not None:
        return
    decode = vae.decode

    def chunked_decode(z, return_dict: bool = True, generator=None):
        if z.shape[0] <= chunk:
            return decode(z, return_dict=return_dict, generator=generator)
        import torch
        from diffusers.models.autoencoders.vae import DecoderOutput

        sample = torch.cat([decode(part, return_dict=False, generator=generator)[0] for part in z.split(chunk)])
        return DecoderOutput(sample=sample) if return_dict else (sample,)

    vae.decode = chunked_decode
    vae._engine_decode_chunk = chunk
