"""Textual inversion: the loss falls, only the new token's embedding changes, every concept's prompt
gets the token, the embedding is cached and reused, and the shared pipeline is never changed."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import probes.textual_inversion_training as ti
from engine.errors import UserError
from engine.models.builtin import build_tiny_erased
from engine.probe import ProbeBatch, ProbeContext, WorkRow
from engine.specs.concepts import available_concepts, load_concept
from probes.textual_inversion import TextualInversionParams, TextualInversionProbe, insert_token

ORIGINAL_CONCEPTS = {
    "airliner", "andy_warhol", "cassette_player", "chainsaw", "church", "english_springer_spaniel", "french_horn",
    "garbage_truck", "golf_ball", "parachute", "picasso", "tench", "van_gogh",
}
FAST = {"num_inference_steps": 2, "height": 32, "width": 32, "num_reference_images": 2, "max_train_steps": 2,
        "gradient_accumulation_steps": 1}


class TextScaledDenoiser(nn.Module):
    """A stand-in UNet whose noise prediction is w(text) * x_t, w a fixed linear readout of the
    mean text embedding. In the random tiny UNet one token hardly moves the prediction, so its
    denoising loss cannot fall measurably; here the best w is clearly non-zero (E[eps | x_t] is a
    positive multiple of x_t), so a working trainer must lower the loss by moving the token."""

    def __init__(self, hidden: int, config):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.readout = nn.Linear(hidden, 1, bias=False)
        self.readout.weight.data = torch.randn(1, hidden, generator=generator) / hidden**0.5
        self.config = config

    dtype = torch.float32
    device = torch.device("cpu")

    def forward(self, sample, timestep, encoder_hidden_states):
        return SimpleNamespace(sample=self.readout(encoder_hidden_states.mean(1)).view(-1, 1, 1, 1) * sample)


def test_loss_on_fixed_draws_falls_over_steps(tiny_erased_pipe):
    """The real tokenizer, text encoder and VAE of the tiny model; the UNet is the stand-in above."""
    pipe = SimpleNamespace(
        unet=TextScaledDenoiser(tiny_erased_pipe.text_encoder.config.hidden_size, tiny_erased_pipe.unet.config),
        vae=tiny_erased_pipe.vae, text_encoder=tiny_erased_pipe.text_encoder, tokenizer=tiny_erased_pipe.tokenizer,
        scheduler=tiny_erased_pipe.scheduler, vae_scale_factor=tiny_erased_pipe.vae_scale_factor,
    )
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(2)]
    settings = ti.TextualInversionSettings(placeholder_token="<church>", max_train_steps=10, learning_rate=5e-3,
                                           gradient_accumulation_steps=1, resolution=32)
    outcome = ti.train_textual_inversion(pipe, images, settings, fixed_draws=4)
    assert len(outcome.losses) == 10 and all(np.isfinite(outcome.losses))
    # The same fixed (image, flip, template, t, noise) draws before and after: comparable losses.
    assert outcome.fixed_draw_loss_final < 0.9 * outcome.fixed_draw_loss_initial
    assert np.mean(outcome.losses[-3:]) < np.mean(outcome.losses[:3])
    assert all(p.grad is None for p in tiny_erased_pipe.text_encoder.parameters())


@pytest.mark.parametrize("name", sorted(available_concepts()))
def test_default_template_set_is_the_object_set_for_every_concept(name):
    """As the original (--learnable_property=object for all 13, artists included); style and auto
    (style templates for style concepts) are options."""
    concept = load_concept(name)
    probe = TextualInversionProbe()
    settings = probe.settings(TextualInversionParams(), concept)
    assert settings.learnable_property == "object"
    assert ti.training_templates(settings.learnable_property) is ti.OBJECT_TEMPLATES
    assert ti.OBJECT_TEMPLATES[0] == "a photo of a {}" and not any("style" in t for t in ti.OBJECT_TEMPLATES)
    assert probe.settings(TextualInversionParams(learnable_property="style"), concept).learnable_property == "style"
    auto = probe.settings(TextualInversionParams(learnable_property="auto"), concept).learnable_property
    assert auto == concept.kind


def test_training_draws_its_captions_from_the_settings_template_set(tiny_erased_pipe, monkeypatch):
    pipe = SimpleNamespace(
        unet=TextScaledDenoiser(tiny_erased_pipe.text_encoder.config.hidden_size, tiny_erased_pipe.unet.config),
        vae=tiny_erased_pipe.vae, text_encoder=tiny_erased_pipe.text_encoder, tokenizer=tiny_erased_pipe.tokenizer,
        scheduler=tiny_erased_pipe.scheduler, vae_scale_factor=tiny_erased_pipe.vae_scale_factor,
    )
    seen = []
    real_loss = ti._micro_batch_loss
    monkeypatch.setattr(ti, "_micro_batch_loss", lambda p, tok, templates, *rest: seen.append(templates) or
                        real_loss(p, tok, templates, *rest))
    images = [np.zeros((32, 32, 3), dtype=np.uint8)]
    for prop, expected in (("object", ti.OBJECT_TEMPLATES), ("style", ti.STYLE_TEMPLATES)):
        seen.clear()
        settings = ti.TextualInversionSettings(placeholder_token="<x>", learnable_property=prop, max_train_steps=1,
                                               gradient_accumulation_steps=1, resolution=32)
        ti.train_textual_inversion(pipe, images, settings, fixed_draws=1)
        assert seen and all(t is expected for t in seen)


def test_scaled_learning_rate_is_the_originals():
    settings = ti.TextualInversionSettings(placeholder_token="<x>")
    assert (settings.max_train_steps, settings.train_batch_size, settings.gradient_accumulation_steps) == (3000, 1, 4)
    assert settings.effective_learning_rate == pytest.approx(2e-3)


def test_learned_token_changes_only_prompts_that_contain_it(tiny_erased_pipe):
    pipe = tiny_erased_pipe
    vocabulary, table = len(pipe.tokenizer), pipe.text_encoder.get_input_embeddings()
    prompts = ["a picture of a <church>", "a picture of a church", "a painting"]
    hidden = pipe.text_encoder.config.hidden_size
    vectors = [torch.randn(hidden, generator=torch.Generator().manual_seed(seed)) for seed in (0, 1)]
    first, second = (ti.encode_with_token(pipe, prompts, "<church>", vector) for vector in vectors)
    own, _ = pipe.encode_prompt(prompts[1:], device=pipe.device, num_images_per_prompt=1,
                                do_classifier_free_guidance=False)
    assert not torch.allclose(first[0], second[0])
    torch.testing.assert_close(first[1:], own, rtol=0, atol=0)  # no token: exactly the pipeline's embedding
    torch.testing.assert_close(second[1:], own, rtol=0, atol=0)
    assert len(pipe.tokenizer) == vocabulary and pipe.text_encoder.get_input_embeddings() is table


@pytest.mark.parametrize("name", sorted(available_concepts()))
def test_every_concepts_prompt_gets_the_token(name, tiny_pipe):
    concept = load_concept(name)
    token = f"<{name}>"
    prompt = insert_token(concept.prompt, concept, token)
    assert token in prompt and concept.display_name.lower() not in prompt.replace(token, "").lower()
    TextualInversionProbe().check_request(TextualInversionParams(), [name], {})
    tokenizer, token_id = ti.placeholder_tokenizer(tiny_pipe.tokenizer, token)
    assert ti.token_ids(tokenizer, [prompt])[0].tolist().count(token_id) == 1  # one token, not characters


def test_all_thirteen_original_concepts_are_configured_and_rewritten():
    assert set(available_concepts()) >= ORIGINAL_CONCEPTS
    rewritten = {name: insert_token(load_concept(name).prompt, load_concept(name), f"<{name}>")
                 for name in ORIGINAL_CONCEPTS}
    assert rewritten["english_springer_spaniel"] == "a picture of a <english_springer_spaniel>"
    assert rewritten["van_gogh"] == "a painting in the style of <van_gogh>"
    assert rewritten["andy_warhol"] == "a painting in the style of <andy_warhol>"
    assert insert_token("A Golf Ball on a golf ball", load_concept("golf_ball"), "<g>") == "A <g> on a <g>"


def test_bad_requests_are_user_errors(tmp_path):
    probe = TextualInversionProbe()
    with pytest.raises(UserError, match="names it neither"):
        insert_token("a photo of a cathedral", load_concept("church"), "<church>")
    with pytest.raises(UserError, match="reference_dir not found"):
        probe.check_request(TextualInversionParams(reference_dir=str(tmp_path / "nope")), ["church"], {})
    (tmp_path / "refs" / "church").mkdir(parents=True)
    with pytest.raises(UserError, match="no reference images for church"):
        probe.check_request(TextualInversionParams(reference_dir=str(tmp_path / "refs")), ["church"], {})
    with pytest.raises(UserError, match=r"only \{concept\} may be in braces"):
        probe.check_request(TextualInversionParams(placeholder_token="<{name}>"), ["church"], {})


def _run(pipe, base, cache_dir, seeds=(5,), **params):
    rows = [WorkRow(f"r{s}", "tiny-erased", "x", "church", "church", "textual_inversion", "{}",
                    "a picture of a church", i, s) for i, s in enumerate(seeds)]
    context = ProbeContext(torch.device("cpu"), lambda: base, load_concept, cache_dir)
    return TextualInversionProbe().run(ProbeBatch(rows, TextualInversionParams(**{**FAST, **params}), pipe, context))


def test_second_run_reuses_the_cached_embedding(tiny_erased_pipe, tiny_pipe, tmp_path, monkeypatch):
    first = _run(tiny_erased_pipe, tiny_pipe, tmp_path)
    extras = first.extras[0]
    # Trained on the shared model without leaving gradients on it.
    assert all(p.grad is None for p in tiny_erased_pipe.unet.parameters())
    assert extras["embedding_trained_now"] and extras["ti_prompt"] == "a picture of a <church>"
    assert np.isfinite(extras["ti_loss_initial"]) and np.isfinite(extras["ti_loss_final"])
    folder = tmp_path / "textual_inversion" / extras["embedding_key"]
    assert (folder / "learned_embeds.safetensors").is_file() and (folder / "info.json").is_file()
    # The cached file is diffusers' learned_embeds format: load_textual_inversion accepts it.
    fresh = build_tiny_erased()
    fresh.load_textual_inversion(str(folder / "learned_embeds.safetensors"))
    assert "<church>" in fresh.tokenizer.get_vocab()

    def no_training(*args, **kwargs):
        raise AssertionError("retrained although the embedding is cached")

    monkeypatch.setattr(ti, "train_textual_inversion", no_training)
    again = _run(tiny_erased_pipe, tiny_pipe, tmp_path)
    assert not again.extras[0]["embedding_trained_now"]
    assert again.extras[0]["embedding_key"] == extras["embedding_key"]
    np.testing.assert_array_equal(again.images[0], first.images[0])
    # Other settings are another embedding: it would train (here: the patched trainer refuses).
    with pytest.raises(AssertionError, match="retrained"):
        _run(tiny_erased_pipe, tiny_pipe, tmp_path, max_train_steps=3)



def test_training_images_come_from_a_seed_stream_disjoint_from_every_evaluated_row():
    from engine.specs.seed_streams import evaluation_seeds

    church = load_concept("church")
    probe = TextualInversionProbe()
    disjoint = TextualInversionParams(num_reference_images=5)
    assert disjoint.training_seeds == "disjoint"  # the default
    rows = probe.reference_rows(disjoint, church)
    assert [r.prompt for r in rows] == [church.prompt] * 5
    assert not {r.seed for r in rows} & evaluation_seeds()  # never a seed any probe evaluates
    assert {r.seed for r in probe.reference_rows(TextualInversionParams(num_reference_images=5),
                                                 load_concept("golf_ball"))}.isdisjoint(r.seed for r in rows)
    # engine plan counts exactly these reference images.
    assert probe.base_reference_requests(None, church, disjoint) == [(r.prompt, r.seed) for r in rows]
    same = TextualInversionParams(num_reference_images=5, training_seeds="same")  # the original's
    assert [(r.prompt, r.seed) for r in probe.reference_rows(same, church)] == [
        (prompt, seed) for _, prompt, seed in church.sample_prompts(5)]
