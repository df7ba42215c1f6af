"""Concept erasure on any diffusers UNet2DConditionModel + text encoder: ESD-x and UCE.

ESD-x (Gandikota et al., "Erasing Concepts from Diffusion Models", ICCV 2023, eq. 2 and the
"-x" variant of sec. 4): fine-tune only the cross-attention key/value projections (`attn2.to_k`,
`attn2.to_v`) so that the model's prediction for the concept c equals the frozen model's
negatively guided prediction

    eps_theta(x_t, c, t)  ->  eps*(x_t, t) - eta * (eps*(x_t, c, t) - eps*(x_t, t)).

Plain ESD-x was not specific in our feasibility run (neighbouring shapes lost 30-45 points), so we
add a preservation term: for other prompts c' (and the empty prompt, which CFG uses at inference),
keep eps_theta(x_t, c', t) equal to the frozen eps*(x_t, c', t). The frozen model is the same UNet
evaluated with the original k/v tensors (torch.func.functional_call), so no second UNet copy is
held in memory, which matters for real SD (860 M parameters).

UCE (Gandikota et al., "Unified Concept Editing in Diffusion Models", WACV 2024, eq. 7): a closed-
form edit of the same projections W that maps the concept's text embeddings to the anchor's
values while keeping the preserved prompts' values:
    W = (lam W0 + sum_e W0 c_anchor c_e^T + sum_p W0 c_p c_p^T) (lam I + sum_e c_e c_e^T + sum_p c_p c_p^T)^-1.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from torch.func import functional_call
from torch.nn import functional as F
from transformers import CLIPTextModel, CLIPTokenizer

from engine.toyworld.shipped import cross_attention_kv_names

logger = logging.getLogger(__name__)


@torch.no_grad()
def embed(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, prompts: list[str]) -> torch.Tensor:
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids.to(text_encoder.device))[0]


@dataclass(frozen=True)
class EsdSettings:
    steps: int = 300
    lr: float = 2e-4
    negative_guidance: float = 1.0  # eta in the ESD objective
    batch_size: int = 16
    preserve_weight: float = 1.0
    preserve_batch_size: int = 16
    sampled_fraction: float = 0.0  # share of x_t drawn by partial DDIM sampling (the ESD paper's source)
    sample_steps: int = 25
    sample_guidance: float = 3.0
    max_seconds: float | None = None
    log_every: int = 25


class _XtSource:
    """Where ESD's x_t come from: noised latents of real images of a prompt (cheap, needs images),
    or, as in the ESD paper, the model's own partial DDIM trajectory for that prompt."""

    def __init__(self, unet, scheduler_config: dict, uncond: torch.Tensor, settings: EsdSettings,
                 generator: torch.Generator):
        self.unet, self.uncond, self.settings, self.generator = unet, uncond, settings, generator
        self.ddim = DDIMScheduler.from_config(scheduler_config)
        self.alphas = self.ddim.alphas_cumprod
        self.num_train_timesteps = self.ddim.config.num_train_timesteps

    def noised(self, latents: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.randint(0, len(latents), (n,), generator=self.generator)
        t = torch.randint(0, self.num_train_timesteps, (n,), generator=self.generator)
        a = self.alphas[t].view(-1, 1, 1, 1)
        x0 = latents[index]
        noise = torch.randn(x0.shape, generator=self.generator)
        return (a.sqrt() * x0 + (1 - a).sqrt() * noise).to(self.unet.device, self.unet.dtype), t.to(self.unet.device)

    @torch.no_grad()
    def sampled(self, cond: torch.Tensor, n: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        self.ddim.set_timesteps(self.settings.sample_steps)
        stop = int(torch.randint(0, self.settings.sample_steps, (1,), generator=self.generator))
        x = torch.randn((n, *shape), generator=self.generator).to(self.unet.device, self.unet.dtype)
        context = torch.cat([self.uncond.expand(n, -1, -1), cond.expand(n, -1, -1)])
        for t in self.ddim.timesteps[:stop]:
            eps_u, eps_c = self.unet(torch.cat([x, x]), t, encoder_hidden_states=context).sample.chunk(2)
            x = self.ddim.step(eps_u + self.settings.sample_guidance * (eps_c - eps_u), t, x).prev_sample
        t = self.ddim.timesteps[stop].expand(n).to(self.unet.device)
        return x, t

    def draw(self, cond: torch.Tensor, latents: torch.Tensor | None, n: int,
             shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        use_sampling = latents is None or (
            self.settings.sampled_fraction > 0 and float(torch.rand(1, generator=self.generator)) <
            self.settings.sampled_fraction)
        return self.sampled(cond, n, shape) if use_sampling else self.noised(latents, n)


def esd_x(unet: UNet2DConditionModel, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, scheduler_config: dict,
          concept_prompt: str, preserve_prompts: list[str], settings: EsdSettings, seed: int,
          concept_latents: torch.Tensor | None = None,
          preserve_latents: dict[str, torch.Tensor] | None = None,
          on_log: Callable[[int, UNet2DConditionModel], bool] | None = None) -> dict[str, float]:
    """Erases `concept_prompt` from `unet` in place (only attn2.to_k/to_v change).

    `concept_latents` / `preserve_latents`: optional scaled VAE latents of images of the concept /
    of each preserved prompt, used as x_0 for noised x_t; without them x_t come from partial
    sampling. `preserve_prompts` may include "" (recommended: CFG's unconditional branch also
    goes through attn2). `on_log(step, unet)` is called every `log_every` steps; returning True
    stops training early. Returns the last logged losses."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    trainable = cross_attention_kv_names(unet)
    if not trainable:
        raise ValueError("this UNet has no cross-attention (attn2) key/value projections to fine-tune")
    params = dict(unet.named_parameters())
    frozen = {name: params[name].detach().clone() for name in trainable}
    unet.requires_grad_(False)
    for name in trainable:
        params[name].requires_grad_(True)
    optimizer = torch.optim.Adam([params[name] for name in trainable], lr=settings.lr)

    device, dtype = unet.device, unet.dtype
    cond = embed(tokenizer, text_encoder, [concept_prompt]).to(device, dtype)
    uncond = embed(tokenizer, text_encoder, [""]).to(device, dtype)
    preserve_embeddings = embed(tokenizer, text_encoder, preserve_prompts).to(device, dtype) if preserve_prompts \
        else None
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    source = _XtSource(unet, scheduler_config, uncond, settings, generator)

    def frozen_eps(x, t, context):
        with torch.no_grad():
            return functional_call(unet, frozen, (x, t), {"encoder_hidden_states": context}).sample

    unet.train()
    start, last = time.monotonic(), {}
    for step in range(1, settings.steps + 1):
        # 1. x_t of the concept; the frozen model's negatively guided target (ESD eq. 2).
        x, t = source.draw(cond, concept_latents, settings.batch_size, shape)
        n = x.shape[0]
        eps_frozen_u, eps_frozen_c = frozen_eps(torch.cat([x, x]), torch.cat([t, t]),
                                                torch.cat([uncond.expand(n, -1, -1), cond.expand(n, -1, -1)])).chunk(2)
        target = eps_frozen_u - settings.negative_guidance * (eps_frozen_c - eps_frozen_u)
        erase_loss = F.mse_loss(unet(x, t, encoder_hidden_states=cond.expand(n, -1, -1)).sample, target)
        loss = erase_loss
        # 2. Preservation: other prompts' predictions stay the frozen model's.
        preserve_loss = torch.zeros(())
        if preserve_embeddings is not None and settings.preserve_weight > 0:
            pick = torch.randint(0, len(preserve_prompts), (settings.preserve_batch_size,), generator=generator)
            xs, ts = [], []
            for index in pick.tolist():
                latents = (preserve_latents or {}).get(preserve_prompts[index])
                if latents is None and concept_latents is not None:
                    latents = concept_latents  # no images of this prompt: keep it on the concept's x_t
                xp, tp = source.draw(preserve_embeddings[index:index + 1], latents, 1, shape)
                xs.append(xp)
                ts.append(tp)
            xp, tp, context = torch.cat(xs), torch.cat(ts), preserve_embeddings[pick.to(device)]
            preserve_loss = F.mse_loss(unet(xp, tp, encoder_hidden_states=context).sample, frozen_eps(xp, tp, context))
            loss = loss + settings.preserve_weight * preserve_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        elapsed = time.monotonic() - start
        stop = settings.max_seconds is not None and elapsed > settings.max_seconds
        if step % settings.log_every == 0 or step == settings.steps or stop:
            last = {"step": step, "erase_loss": erase_loss.item(), "preserve_loss": preserve_loss.item(),
                    "seconds": elapsed}
            logger.info("esd-x %r step %d/%d erase %.5f preserve %.5f (%.0f s)", concept_prompt, step,
                        settings.steps, erase_loss.item(), preserve_loss.item(), elapsed)
            if on_log is not None:
                unet.eval()
                stop = bool(on_log(step, unet)) or stop
                unet.train()
        if stop:
            logger.info("esd-x %r: stopped at step %d", concept_prompt, step)
            break
    unet.eval().requires_grad_(False)
    return last


def _tail(tokenizer: CLIPTokenizer, embeddings: torch.Tensor, prompts: list[str]) -> list[torch.Tensor]:
    """Per prompt, the embeddings from its last word token to the end (the EOS padding carries
    the whole prompt in a causal text encoder), as UCE aligns concept and anchor tokens."""
    lengths = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").attention_mask.sum(dim=1)
    return [embeddings[i, max(0, int(lengths[i]) - 2):] for i in range(len(prompts))]


@torch.no_grad()
def uce(unet: UNet2DConditionModel, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, concept_prompts: list[str],
        anchor_prompts: list[str], preserve_prompts: list[str], lam: float = 0.1,
        preserve_scale: float = 1.0) -> None:
    """UCE's closed-form edit of every attn2.to_k/to_v, in place."""
    if len(concept_prompts) != len(anchor_prompts):
        raise ValueError("uce needs one anchor prompt per concept prompt")
    all_prompts = concept_prompts + anchor_prompts + preserve_prompts
    tails = _tail(tokenizer, embed(tokenizer, text_encoder, all_prompts).float(), all_prompts)
    n_e = len(concept_prompts)
    pairs = []
    for concept, anchor in zip(tails[:n_e], tails[n_e:2 * n_e], strict=False):
        m = min(len(concept), len(anchor))
        pairs.append((concept[:m], anchor[:m]))
    preserved = tails[2 * n_e:]
    for name, module in unet.named_modules():
        if not (name.endswith("attn2.to_k") or name.endswith("attn2.to_v")):
            continue
        w0 = module.weight.detach().float().cpu()
        dim = w0.shape[1]
        left = lam * w0
        right = lam * torch.eye(dim)
        for concept, anchor in pairs:
            c, a = concept.cpu(), anchor.cpu()
            left += (w0 @ a.T) @ c
            right += c.T @ c
        for p in preserved:
            p = p.cpu()
            left += preserve_scale * (w0 @ p.T) @ p
            right += preserve_scale * p.T @ p
        module.weight.copy_((left @ torch.linalg.inv(right)).to(module.weight.dtype))
