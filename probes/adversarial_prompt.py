"""Adversarial-prompt probe: UnlearnDiffAtk's text-gradient attack (Zhang et al., ECCV 2024, arXiv 2310.11868).

The diffusion model is its own classifier: k adversarial tokens, inserted before (or after) the
concept's prompt, are optimised so that the erased model denoises the base model's image of the
same prompt and seed as well as it can. Per row:

1. Target: the base model's image for the row's prompt and seed (engine.sampling's cached base
   references, shared with inpainting and textual inversion), VAE-encoded to x0.
2. The plain prompt is generated and judged first; a row whose plain prompt already shows the
   concept is recorded as such and not attacked (as UnlearnDiffAtk).
3. k distributions over the vocabulary (special tokens left out), initialised uniform. For each
   timestep t of a fixed list, `iterations` Adam steps on ||eps_theta(x_t, t, text(adv + prompt)) -
   eps||^2, x_t the noised x0; the forward pass embeds a straight-through one-hot sample of each
   distribution (the gradient passes through clipped to [-1, 1]); every step ends with a Euclidean
   projection onto the probability simplex.
4. After each timestep's iterations the argmax tokens, as token ids (never decoded and
   re-tokenised), generate an image from the row's seed with the model's own pipeline and
   scheduler; the judge-hit API judges it; `stop_on_success` ends the row at the first hit.

`mode: random` is its control: k tokens drawn uniformly from the row's own generator, redrawn for
each image, with the same image budget and stop rule, so "an optimised prompt" is separated from
"any k extra tokens, as many tries". Rows run one after another (discrete token choices amplify
batch-order float differences), each with its own generator and optimiser. The shared text
encoder's embedding table is wrapped only inside a `with` block and restored. Differences from
the public implementation: docs/deviations.md.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator

from engine import sampling
from engine.errors import UserError
from engine.probe import Probe, ProbeBatch, ProbeOutput, ProbeParams, WorkRow, row_generator
from probes.textual_inversion_training import extra_token_embedding

logger = logging.getLogger(__name__)

PAPER = "UnlearnDiffAtk, Zhang et al., ECCV 2024, arXiv 2310.11868"


class AdversarialPromptParams(ProbeParams):
    """Shared generation parameters plus the attack's budget (defaults: the public implementation's)."""

    mode: Literal["attack", "random"] = Field(
        "attack", description=f"attack: the text-gradient attack ({PAPER}); random: its control, k random tokens "
        "redrawn for each image, same budget and stop rule.")
    num_tokens: int = Field(3, ge=1, le=32, description="k, the adversarial tokens inserted (the paper: 3).")
    insertion: Literal["prefix", "suffix"] = Field(
        "prefix", description="Where the tokens go: before the prompt (the paper) or after it.")
    timesteps: list[int] = Field(
        default_factory=lambda: list(range(10, 1000, 20)), min_length=1,
        description="The attack's timesteps, in order (default every 20th from 10 to 990: 50); after each "
        "timestep's iterations the argmax prompt makes one image.")
    iterations: int = Field(40, ge=1, le=10_000, description="Adam steps per timestep (the paper's code: 40).")
    learning_rate: float = Field(0.01, gt=0, description="Adam learning rate on the token distributions (0.01).")
    weight_decay: float = Field(0.1, ge=0, description="Adam weight decay (L2) on the distributions (0.1).")
    stop_on_success: bool = Field(
        True, description="Stop a row at the first image the judge recognises (the paper); the row's value is then "
        "chosen by the judge and marked as such. Without a classifier judge every row spends its whole budget.")
    max_images: int = Field(
        50, ge=1, le=10_000, description="Most adversarial-prompt images per row (the plain-prompt check not "
        "counted); the attack makes at most min(max_images, len(timesteps)), the random control the same number.")

    @field_validator("timesteps")
    @classmethod
    def _in_range(cls, value: list[int]) -> list[int]:
        if any(t < 0 or t > 999 for t in value):
            raise ValueError("timesteps must lie in 0..999")
        return value

    def image_budget(self) -> int:
        """Adversarial images per row at most: one per timestep, bounded by max_images."""
        return min(self.max_images, len(self.timesteps))


# --------------------------------------------------------------------------- the attack's pieces


def project_to_simplex(values: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each row onto the probability simplex (Duchi et al. 2008, Fig. 1):
    the nearest non-negative vector summing to 1; a point of the simplex maps to itself.
    """
    sorted_values, _ = torch.sort(values, dim=-1, descending=True)
    cumulative = sorted_values.cumsum(dim=-1) - 1
    ranks = torch.arange(1, values.shape[-1] + 1, device=values.device, dtype=values.dtype)
    support = (sorted_values - cumulative / ranks) > 0
    rho = support.to(values.dtype).cumsum(dim=-1).argmax(dim=-1, keepdim=True)  # last index in the support
    theta = cumulative.gather(-1, rho) / (rho + 1).to(values.dtype)
    return (values - theta).clamp(min=0)


class StraightThroughOneHot(torch.autograd.Function):
    """Forward: the one-hot vectors of `indices` (a sample of each distribution); backward: the
    gradient passes to the distributions unchanged but clipped to [-1, 1] (hardtanh, as the paper's code).
    """

    @staticmethod
    def forward(ctx, distributions: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        one_hot = torch.zeros_like(distributions)
        return one_hot.scatter_(-1, indices.unsqueeze(-1), 1.0)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        return grad_output.clamp(-1.0, 1.0), None


def allowed_token_ids(pipe) -> torch.Tensor:
    """The vocabulary the tokens are drawn from: every embedded id but the tokenizer's specials."""
    size = min(len(pipe.tokenizer), pipe.text_encoder.get_input_embeddings().num_embeddings)
    special = set(pipe.tokenizer.all_special_ids)
    return torch.tensor([i for i in range(size) if i not in special], dtype=torch.long)


def prompt_ids(pipe, prompt: str, inserted: list[int], insertion: str) -> torch.Tensor:
    """(1, max_length) ids: the prompt's tokens (shortened to leave room) with `inserted` ids put
    after the start token or before the end token, padded as the pipeline pads.
    """
    tokenizer = pipe.tokenizer
    length = tokenizer.model_max_length
    if length - len(inserted) < 3:  # start, one prompt token, end
        raise UserError(f"adversarial_prompt: {len(inserted)} tokens leave no room for the prompt in this "
                        f"tokenizer's {length} tokens; lower num_tokens")
    ids = tokenizer(prompt, truncation=True, max_length=length - len(inserted)).input_ids  # [bos, ..., eos]
    ids = [ids[0], *inserted, *ids[1:]] if insertion == "prefix" else [*ids[:-1], *inserted, ids[-1]]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ids[-1]
    return torch.tensor([ids + [pad] * (length - len(ids))], device=pipe.text_encoder.device)


def encode_ids(pipe, ids: torch.Tensor) -> torch.Tensor:
    """The text encoder's last hidden state for ids, as the pipeline's encode_prompt makes it."""
    return pipe.text_encoder(ids)[0].to(pipe.text_encoder.dtype)


# --------------------------------------------------------------------------- the probe


class AdversarialPromptProbe(Probe[AdversarialPromptParams]):
    """UnlearnDiffAtk's adversarial-prompt attack (or its random-token control) on the erased model."""

    name = "adversarial_prompt"
    params_class = AdversarialPromptParams
    smoke_params = {"timesteps": [500, 300], "iterations": 2, "max_images": 2}
    requires = frozenset({"base_model", "reference_images"})
    sampler = "pipeline"  # its images come from the model's own pipeline and scheduler, as the standard prompt's
    role = "recovery"
    needs_base_reference = True
    best_of_n = False
    base_reference = False
    baseline = False

    def base_reference_requests(self, row, concept, params: AdversarialPromptParams) -> list[tuple[str, int]]:
        """The attack's target: the base model's image of the row's own prompt and seed (the control needs none)."""
        return [(row.prompt, row.seed)] if params.mode == "attack" else []

    def controls(self, params: AdversarialPromptParams) -> str | None:
        return self.name if params.mode == "random" else None

    def images_per_row(self, params: AdversarialPromptParams) -> int:
        return 1 + params.image_budget()  # the plain-prompt check, then the attack's images

    def row_optimisation_passes(self, params: AdversarialPromptParams) -> int:
        return params.image_budget() * params.iterations if params.mode == "attack" else 0

    @torch.no_grad()
    def run(self, batch: ProbeBatch[AdversarialPromptParams]) -> ProbeOutput:
        params = batch.params
        targets: list[Any] = [None] * len(batch.rows)
        if params.mode == "attack":
            references, _ = sampling.base_reference_images(batch.context, batch.rows, params)
            targets = list(references)
        images, extras = [], []
        for row, target in zip(batch.rows, targets, strict=True):  # one after another: see the module doc
            image, extra = self._run_row(batch, row, target)
            images.append(image)
            extras.append(extra)
        return ProbeOutput(images=images, extras=extras)

    def _run_row(
        self, batch: ProbeBatch[AdversarialPromptParams], row: WorkRow, target: np.ndarray | None
    ) -> tuple[np.ndarray, dict]:
        params = batch.params
        pipe = batch.pipeline
        judge = batch.context.judge_hits
        generator = row_generator(row.seed, self.name, params.mode)  # the row's own draws (samples, noise, tokens)
        negative = sampling.prompt_embeddings(pipe, [params.negative_prompt]) if params.guidance_scale > 1 else None

        def generate(embeds: torch.Tensor) -> np.ndarray:
            return _generate(pipe, params, embeds, negative, row.seed)

        def hit(image: np.ndarray) -> bool | None:
            # With stop_on_success the judge decides which image the row keeps: a selection, recorded
            # in the row's `selector` column so reports mark the rate as inflated.
            hits = None if judge is None else judge([image], row.target_concept, [None],
                                                    record_selection=params.stop_on_success)
            return None if hits is None else bool(hits[0])

        extra: dict[str, Any] = {"mode": params.mode, "judged": False, "plain_prompt_success": None,
                                 "optimisation_steps": 0, "images_made": 0, "success_image": None,
                                 "adversarial_token_ids": [], "adversarial_prompt": row.prompt,
                                 "loss_first": None, "loss_last": None}

        # 1. The plain prompt, as the standard probe makes it; a success is not attacked.
        plain = generate(sampling.prompt_embeddings(pipe, [row.prompt]))
        plain_hit = hit(plain)
        extra.update(judged=plain_hit is not None, plain_prompt_success=plain_hit, images_made=1)
        if plain_hit:
            extra["success_image"] = 0
            return plain, extra

        # 2. The attack's (or the control's) images, one per timestep, up to the budget.
        allowed = allowed_token_ids(pipe)
        attack = None
        if params.mode == "attack":
            if target is None:
                raise ValueError(f"row {row.row_id}: the attack has no base-model image to aim at")
            attack = _Attack(pipe, params, row, target, allowed, generator)
        image = plain
        for index in range(params.image_budget()):
            if attack is not None:
                attack.optimise(params.timesteps[index])
                chosen = attack.argmax_ids()
            else:
                draw = torch.randint(len(allowed), (params.num_tokens,), generator=generator)
                chosen = allowed[draw].tolist()
            image = generate(encode_ids(pipe, prompt_ids(pipe, row.prompt, chosen, params.insertion)))
            success = hit(image)
            extra["images_made"] += 1
            extra["adversarial_token_ids"] = chosen
            extra["adversarial_prompt"] = _prompt_text(pipe, row.prompt, chosen, params.insertion)
            if success and extra["success_image"] is None:
                extra["success_image"] = index + 1
            if success and params.stop_on_success:
                break
        if attack is not None:
            extra.update(optimisation_steps=attack.steps, loss_first=attack.losses[0], loss_last=attack.losses[-1])
        return image, extra


class _Attack:
    """One row's optimisation state: its token distributions, Adam, target latents and losses."""

    def __init__(self, pipe, params: AdversarialPromptParams, row: WorkRow, target: np.ndarray,
                 allowed: torch.Tensor, generator: torch.Generator):
        self.pipe, self.params, self.row, self.generator = pipe, params, row, generator
        self.allowed = allowed
        device = pipe.text_encoder.device
        table = pipe.text_encoder.get_input_embeddings().weight.detach()
        self.embedding_rows = table[allowed.to(table.device)].float()  # (V, hidden), the candidates' embeddings
        self.first_placeholder = table.shape[0]  # ids from here embed as the adversarial vectors
        self.placeholder_ids = list(range(self.first_placeholder, self.first_placeholder + params.num_tokens))
        self.ids = prompt_ids(pipe, row.prompt, self.placeholder_ids, params.insertion)
        self.x0 = _encode_image(pipe, target)
        self.alphas_cumprod = sampling.DDIMSchedule.from_pipeline(pipe, 1).alphas_cumprod
        uniform = torch.full((params.num_tokens, len(allowed)), 1.0 / len(allowed), device=device)
        self.distributions = uniform.requires_grad_(True)
        self.optimiser = torch.optim.Adam([self.distributions], lr=params.learning_rate,
                                          weight_decay=params.weight_decay)
        self.steps = 0
        self.losses: list[float] = []

    def loss(self, t: int, indices: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """||eps_theta(x_t, t, text(adv + prompt)) - eps||^2 (mean), adv the one-hot of `indices`."""
        one_hot = StraightThroughOneHot.apply(self.distributions, indices)
        vectors = one_hot @ self.embedding_rows.to(one_hot.device)
        alpha_bar = float(self.alphas_cumprod[t])
        x_t = alpha_bar**0.5 * self.x0 + (1 - alpha_bar) ** 0.5 * noise
        with extra_token_embedding(self.pipe.text_encoder, vectors, self.first_placeholder):
            text = self.pipe.text_encoder(self.ids)[0]
        unet = self.pipe.unet
        eps = unet(x_t.to(unet.dtype), t, encoder_hidden_states=text.to(unet.dtype)).sample
        return torch.nn.functional.mse_loss(eps.float(), noise.float())

    def optimise(self, t: int) -> None:
        device = self.distributions.device
        with torch.enable_grad():
            for _ in range(self.params.iterations):
                probabilities = self.distributions.detach().float().cpu().clamp(min=0)
                indices = torch.multinomial(probabilities, 1, generator=self.generator).squeeze(-1).to(device)
                noise = torch.randn(self.x0.shape, generator=self.generator).to(self.x0.device)
                loss = self.loss(t, indices, noise)
                # The gradient of the distributions only: the shared model's weights get no .grad.
                (self.distributions.grad,) = torch.autograd.grad(loss, [self.distributions])
                self.optimiser.step()
                with torch.no_grad():
                    self.distributions.copy_(project_to_simplex(self.distributions))
                self.steps += 1
                self.losses.append(float(loss.detach()))

    def argmax_ids(self) -> list[int]:
        return self.allowed[self.distributions.detach().argmax(dim=-1).cpu()].tolist()


@torch.no_grad()
def _encode_image(pipe, image: np.ndarray) -> torch.Tensor:
    """x0: the VAE posterior mean of a uint8 image, scaled as the UNet's latents."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1).unsqueeze(0)
    pixels = pixels.to(pipe.vae.device, pipe.vae.dtype)
    return pipe.vae.encode(pixels).latent_dist.mean.float() * pipe.vae.config.scaling_factor


def _generate(pipe, params: AdversarialPromptParams, embeds: torch.Tensor, negative, seed: int) -> np.ndarray:
    """One image from the row's seed through the model's own pipeline (the standard probe's call)."""
    return sampling.pipeline_images(pipe, params, embeds, negative, [row_generator(seed)])[0]


def _prompt_text(pipe, prompt: str, ids: list[int], insertion: str) -> str:
    """The adversarial prompt as text, for reading only (the images were made from the ids)."""
    words = pipe.tokenizer.decode(ids).strip()
    return f"{words} {prompt}" if insertion == "prefix" else f"{prompt} {words}"
