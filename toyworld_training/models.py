"""Component configs of the toy Stable-Diffusion-style pipeline (sizes from the feasibility run).

Stock diffusers/transformers classes only, so every probe and judge runs on the result unchanged:
32x32 RGB images, a 4x AutoencoderKL (8x8x4 latents), a 2.4 M-parameter UNet2DConditionModel with
cross-attention at both levels, a 74 k-parameter CLIPTextModel, DDIM with SD's noise schedule.
`ToySizes.tiny()` shrinks everything for the training-code test.
"""

from __future__ import annotations

from dataclasses import dataclass

from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from engine.toyworld.render import IMAGE_SIZE

LATENT_SIZE = IMAGE_SIZE // 4


@dataclass(frozen=True)
class ToySizes:
    vae_channels: tuple[int, ...] = (32, 64, 64)
    vae_groups: int = 16
    unet_channels: tuple[int, ...] = (48, 96)
    unet_groups: int = 16
    text_hidden: int = 64
    text_layers: int = 2

    @classmethod
    def tiny(cls) -> ToySizes:
        return cls(vae_channels=(8, 16, 16), vae_groups=8, unet_channels=(16, 32), unet_groups=8,
                   text_hidden=16, text_layers=1)


def scheduler_config() -> dict:
    # SD 1.x noise schedule (scaled_linear 0.00085 -> 0.012, 1000 steps).
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def build_vae(sizes: ToySizes) -> AutoencoderKL:
    # Three blocks -> two downsamplings -> 4x: 32x32 images, 8x8 latents.
    n = len(sizes.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        block_out_channels=tuple(sizes.vae_channels), norm_num_groups=sizes.vae_groups,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        sample_size=IMAGE_SIZE,
    )


def build_unet(sizes: ToySizes, cross_attention_dim: int) -> UNet2DConditionModel:
    n = len(sizes.unet_channels)
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=tuple(sizes.unet_channels), norm_num_groups=sizes.unet_groups,
        down_block_types=("CrossAttnDownBlock2D",) * n, up_block_types=("CrossAttnUpBlock2D",) * n,
        cross_attention_dim=cross_attention_dim, attention_head_dim=8,
    )


def build_text_encoder(sizes: ToySizes, tokenizer: CLIPTokenizer) -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=sizes.text_hidden, intermediate_size=2 * sizes.text_hidden,
        num_hidden_layers=sizes.text_layers, num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))


def training_scheduler() -> DDPMScheduler:
    config = scheduler_config()
    config.pop("set_alpha_to_one")  # a DDIM-only option
    return DDPMScheduler(**config)


def assemble_pipeline(unet, vae, text_encoder, tokenizer) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        scheduler=DDIMScheduler(**scheduler_config()),
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
