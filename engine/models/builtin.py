"""Built-in models that need no files and no network: random weights, seeded, built from configs.

`tiny` is a Stable Diffusion pipeline with the real classes at toy size (64x64 images) for tests
and smoke runs. `tiny-erased` is `tiny` with its cross-attention key/value projections re-drawn,
the weights an ESD-x style method changes, so it behaves like an erased variant of `tiny`.
`sd14-random` has the full SD 1.4 architecture with random weights, for GPU benchmarks (speed does
not depend on weight values); `sd14-small` is SD 1.4's layout at small width with 16x16 latents, the
CPU benchmark's model. Names and descriptions import nothing heavy; a model's libraries are
imported when it is built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the builders import torch, diffusers and transformers when called, so that
    # resolving a model name in the driver stays light (a bad name fails in well under a second)
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer


@dataclass(frozen=True)
class BuiltinModel:
    build: Callable[[], StableDiffusionPipeline]
    method: str
    description: str
    erased: tuple[str, ...] = ()  # concept slugs the model erased (empty: it declares nothing)
    scheduler: str = "DDIMScheduler"  # the pipeline's own scheduler class (engine plan counts its steps)
    image_side: int = 512  # pixels per side of its images (engine.pipeline.space sizes the output by it)


def byte_symbols() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable symbol table: printable bytes map to themselves, the rest to
    code points from 256 up, so every byte has a visible, whitespace-free symbol."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def byte_level_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """A CLIP tokenizer with one token per character (512 byte symbols + 2 specials), built in code.

    transformers 5 builds CLIPTokenizer from a vocab dict and merges; with no merges every
    character becomes a token, which is enough for random test models.
    """
    from transformers import CLIPTokenizer

    symbols = list(byte_symbols().values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(vocab_list)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def _sd_scheduler_config() -> dict:
    # SD 1.x noise schedule (scaled_linear 0.00085 -> 0.012), as CompVis SD 1.4 ships it.
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def _pipeline(unet, vae, text_encoder, tokenizer, scheduler) -> StableDiffusionPipeline:
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


def build_tiny(seed: int = 0) -> StableDiffusionPipeline:
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = byte_level_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        sample_size=64,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=5,
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    return _pipeline(unet, vae, text_encoder, tokenizer, DDIMScheduler(**_sd_scheduler_config()))


def build_tiny_erased() -> StableDiffusionPipeline:
    import torch

    pipe = build_tiny(seed=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in pipe.unet.named_parameters():
            if ".attn2.to_k." in name or ".attn2.to_v." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * param.std())
    return pipe


def build_sd14_random() -> StableDiffusionPipeline:
    """SD 1.4's architecture with random weights: 860 M UNet, 84 M VAE, CLIP ViT-L/14's text tower
    (85 M here: the 514-symbol test vocabulary instead of 49,408 tokens; the same compute)."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = byte_level_tokenizer()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64,
        cross_attention_dim=768,
        attention_head_dim=8,
        block_out_channels=(320, 640, 1280, 1280),
    )
    vae = AutoencoderKL(
        block_out_channels=[128, 256, 512, 512],
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        latent_channels=4,
        layers_per_block=2,
        sample_size=512,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(  # CLIP ViT-L/14's text tower, as SD 1.4 uses it
            hidden_size=768,
            intermediate_size=3072,
            num_attention_heads=12,
            num_hidden_layers=12,
            projection_dim=768,
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    # PNDM as CompVis SD 1.4 ships it (51 UNet calls for 50 steps); it has no clip_sample option.
    config = {k: v for k, v in _sd_scheduler_config().items() if k != "clip_sample"}
    scheduler = PNDMScheduler(**config, skip_prk_steps=True)
    return _pipeline(unet, vae, text_encoder, tokenizer, scheduler)


def build_sd14_small() -> StableDiffusionPipeline:
    """SD 1.4's layout at a fraction of its width, for CPU benchmarks: the same blocks (4 UNet
    levels, cross-attention in 3, 2 layers per block, an 8x VAE), PNDM as SD 1.4 ships it, and
    16x16 latents (128x128 images). Random weights: speed does not depend on their values."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = byte_level_tokenizer()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16,
        cross_attention_dim=128,
        attention_head_dim=8,
        block_out_channels=(32, 64, 128, 128),
    )
    vae = AutoencoderKL(
        block_out_channels=[32, 64, 128, 128],
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        latent_channels=4,
        layers_per_block=2,
        sample_size=128,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=128,
            intermediate_size=512,
            num_attention_heads=4,
            num_hidden_layers=12,
            projection_dim=128,
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    config = {k: v for k, v in _sd_scheduler_config().items() if k != "clip_sample"}
    return _pipeline(unet, vae, text_encoder, tokenizer, PNDMScheduler(**config, skip_prk_steps=True))


def _toy_model(method: str | None = None, concept: str | None = None):
    """Loader of a shipped toy-world model (engine/toyworld/weights), imported only when built."""

    def build() -> StableDiffusionPipeline:
        from engine.toyworld.shipped import load_toy_base, load_toy_erased

        if method is None:
            return load_toy_base()
        assert concept is not None  # every erased toy model in BUILTIN_MODELS names its concept
        return load_toy_erased(method, concept)

    return build


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "tiny": BuiltinModel(build_tiny, "none", "random tiny SD pipeline (64x64), seeded, for tests",
                         image_side=64),
    # Declares no erased concept: a random stand-in, so it runs the full grid of whatever a run lists.
    "tiny-erased": BuiltinModel(
        build_tiny_erased, "random-kv", "tiny with re-drawn cross-attention k/v (a stand-in erased model)",
        image_side=64,
    ),
    "sd14-random": BuiltinModel(build_sd14_random, "none", "full SD 1.4 architecture, random weights",
                                scheduler="PNDMScheduler"),
    "sd14-small": BuiltinModel(
        build_sd14_small, "none", "SD 1.4's layout at small width, 16x16 latents, PNDM (CPU benchmarks)",
        scheduler="PNDMScheduler", image_side=128,
    ),
    "toy-base": BuiltinModel(_toy_model(), "none", "toy world: trained 32x32 shapes model (engine/toyworld)",
                             image_side=32),
    "toy-esdx-circle": BuiltinModel(_toy_model("esdx", "circle"), "esd-x", "toy-base with circle erased by ESD-x",
                                    ("toy_circle",), image_side=32),
    "toy-esdx-triangle": BuiltinModel(_toy_model("esdx", "triangle"), "esd-x", "toy-base, triangle erased by ESD-x",
                                      ("toy_triangle",), image_side=32),
    "toy-uce-circle": BuiltinModel(_toy_model("uce", "circle"), "uce", "toy-base with circle erased by UCE",
                                   ("toy_circle",), image_side=32),
    "toy-uce-triangle": BuiltinModel(_toy_model("uce", "triangle"), "uce", "toy-base with triangle erased by UCE",
                                     ("toy_triangle",), image_side=32),
}
