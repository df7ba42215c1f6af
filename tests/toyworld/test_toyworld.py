"""The toy world: renderer, tokenizer, judge API, training code (tiny build), ESD-x and UCE edits,
concept configs and built-in registration. Shipped-weights quality checks live in
tests/toyworld/test_toyworld_weights.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engine.toyworld.render import CONCEPTS, IMAGE_SIZE, caption, render, render_dataset
from engine.toyworld.shipped import cross_attention_kv_names
from engine.toyworld.tokenizer import build_toy_tokenizer
from toyworld_training import erase, models


@pytest.fixture(scope="module")
def tokenizer():
    return build_toy_tokenizer()


@pytest.fixture()
def tiny_parts(tokenizer):
    torch.manual_seed(0)
    sizes = models.ToySizes.tiny()
    text_encoder = models.build_text_encoder(sizes, tokenizer).eval()
    unet = models.build_unet(sizes, cross_attention_dim=sizes.text_hidden)
    return unet, text_encoder


# --------------------------------------------------------------------------- renderer


def test_render_dataset_is_deterministic_and_interleaved():
    images, labels = render_dataset(3, seed=5)
    again, _ = render_dataset(3, seed=5)
    other, _ = render_dataset(3, seed=6)
    assert images.shape == (3 * len(CONCEPTS), IMAGE_SIZE, IMAGE_SIZE, 3) and images.dtype == np.uint8
    assert np.array_equal(images, again)
    assert not np.array_equal(images, other)
    assert labels.tolist() == list(range(len(CONCEPTS))) * 3


def test_every_concept_draws_a_visible_shape():
    rng = np.random.default_rng(0)
    for concept in CONCEPTS:
        image = render(concept, rng).astype(float)
        # foreground and background differ by > 70 luminance, so the image is never flat
        assert image.std() > 10, concept


def test_captions_and_unknown_concept():
    assert caption("circle") == "a picture of a circle"
    with pytest.raises(ValueError, match="unknown toy concept"):
        render("hexagon", np.random.default_rng(0))


# --------------------------------------------------------------------------- tokenizer


def test_each_concept_word_is_one_real_token(tokenizer):
    specials = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    seen = set()
    for concept in CONCEPTS:
        ids = tokenizer(caption(concept)).input_ids
        # <bos> a picture of a <concept> <eos>
        assert len(ids) == 7, (concept, tokenizer.convert_ids_to_tokens(ids))
        assert ids[5] not in specials
        assert tokenizer.convert_ids_to_tokens(ids[5]) == concept + "</w>"
        seen.add(ids[5])
    assert len(seen) == len(CONCEPTS)


def test_unknown_words_fall_back_to_characters(tokenizer):
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("a zebra").input_ids)
    assert tokens[2:-1] == ["z", "e", "b", "r", "a</w>"]
    assert tokenizer.model_max_length == 16


# --------------------------------------------------------------------------- judge API


def test_judge_classify_returns_probabilities_and_checks_input():
    from engine.toyworld.judge import ToyJudge, ToyJudgeNet

    torch.manual_seed(0)
    judge = ToyJudge(ToyJudgeNet())
    images, _ = render_dataset(1, seed=0)
    probs = judge.classify(images)
    assert probs.shape == (len(CONCEPTS), len(CONCEPTS))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    big = np.repeat(np.repeat(images, 2, axis=1), 2, axis=2)  # 64x64: resized to the judge's 32x32
    np.testing.assert_allclose(judge.classify(big), probs, atol=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        judge.classify(images.astype(np.float32))


# --------------------------------------------------------------------------- training code


@pytest.mark.slow
def test_tiny_build_runs_every_stage_and_resumes(tmp_path):
    from engine.toyworld.shipped import load_toy_base, load_toy_erased
    from toyworld_training.build import BuildSettings, build_toy_world

    work, export = tmp_path / "work", tmp_path / "weights"
    report = build_toy_world(work, BuildSettings.tiny(), export_dir=export, log_file=work / "build.log")
    stages = report["stages"]
    assert set(stages) == {"judge", "vae", "latents", "diffusion", "erase"}
    assert stages["diffusion"]["step"] == BuildSettings.tiny().diffusion.steps
    assert set(stages["diffusion"]["eval"]["rates"]) == set(CONCEPTS)
    assert set(stages["erase"]) == {"esdx-circle", "uce-circle"}
    assert "diffusion step 4/4" in (work / "build.log").read_text()
    for name in ["toy-base/model_index.json", "judge.safetensors", "esdx-circle.safetensors",
                 "uce-circle.safetensors", "build_report.json"]:
        assert (export / name).exists(), name
    # a second run finds every stage done and retrains nothing
    before = (work / "base.json").read_text()
    build_toy_world(work, BuildSettings.tiny(), export_dir=None)
    assert (work / "base.json").read_text() == before
    # the exported erased model differs from the base only in attn2 k/v
    base, erased = load_toy_base(export), load_toy_erased("esdx", "circle", export)
    kv = set(cross_attention_kv_names(base.unet))
    base_state, erased_state = base.unet.state_dict(), erased.unet.state_dict()
    changed = {k for k in base_state if not torch.equal(base_state[k], erased_state[k])}
    assert changed and changed <= kv
    assert json.loads((export / "build_report.json").read_text())["stages"]["judge"]["test_images"] > 0


# --------------------------------------------------------------------------- erasure


def test_esd_x_changes_only_cross_attention_kv_and_computes_preservation(tiny_parts, tokenizer):
    unet, text_encoder = tiny_parts
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    latents = torch.randn(8, 4, models.LATENT_SIZE, models.LATENT_SIZE)
    settings = erase.EsdSettings(steps=3, lr=1e-2, batch_size=2, preserve_batch_size=2, log_every=1)
    logged = []
    stats = erase.esd_x(unet, text_encoder, tokenizer, models.scheduler_config(), caption("circle"),
                        [caption("square"), ""], settings, seed=0, concept_latents=latents,
                        preserve_latents={caption("square"): latents, "": latents},
                        on_log=lambda step, _: logged.append(step) and False)
    kv = set(cross_attention_kv_names(unet))
    assert kv and all(".attn2.to_" in k for k in kv)
    changed = {k for k, v in unet.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == kv
    assert logged == [1, 2, 3]
    # after the first update the trained k/v differ from the frozen ones, so preservation bites
    assert stats["preserve_loss"] > 0 and np.isfinite(stats["preserve_loss"])
    assert stats["erase_loss"] > 0
    assert not any(p.requires_grad for p in unet.parameters())


def test_esd_x_without_images_samples_x_t_and_can_stop_early(tiny_parts, tokenizer):
    unet, text_encoder = tiny_parts
    settings = erase.EsdSettings(steps=5, batch_size=2, preserve_weight=0.0, sampled_fraction=1.0,
                                 sample_steps=3, log_every=1)
    stats = erase.esd_x(unet, text_encoder, tokenizer, models.scheduler_config(), caption("circle"), [],
                        settings, seed=0, on_log=lambda step, _: step >= 2)
    assert stats["step"] == 2 and stats["preserve_loss"] == 0.0


def test_uce_moves_concept_values_to_the_anchor_and_keeps_preserved(tiny_parts, tokenizer):
    unet, text_encoder = tiny_parts
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    prompts = [caption("circle"), "", caption("square")]
    tails = erase._tail(tokenizer, erase.embed(tokenizer, text_encoder, prompts), prompts)
    m = min(len(tails[0]), len(tails[1]))
    erase.uce(unet, text_encoder, tokenizer, [prompts[0]], [prompts[1]], [prompts[2]], lam=0.01)
    changed = {k for k, v in unet.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and changed <= set(cross_attention_kv_names(unet))
    name = sorted(changed)[0]
    w0, w1 = before[name], unet.state_dict()[name]
    target = tails[1][:m] @ w0.T
    assert (tails[0][:m] @ w1.T - target).norm() < 0.5 * (tails[0][:m] @ w0.T - target).norm()
    kept = tails[2] @ w0.T
    assert (tails[2] @ w1.T - kept).norm() < 0.5 * (tails[0][:m] @ w0.T - target).norm()


# --------------------------------------------------------------------------- configs and registry


def test_toy_concept_configs_match_the_renderer():
    from engine.specs.concepts import load_concept

    for index, concept in enumerate(CONCEPTS):
        spec = load_concept(f"toy_{concept}")
        assert spec.prompt == caption(concept)
        assert spec.judge_classes == {"toy": [index]}
        assert len(spec.seed_list()) == 100 and min(spec.seed_list()) >= 1000


def test_toy_models_are_registered_builtins():
    from engine.models.builtin import BUILTIN_MODELS
    from engine.toyworld.shipped import toy_model_names

    for name, (method, _) in toy_model_names().items():
        assert BUILTIN_MODELS[name].method == method


def test_toy_judge_is_registered_and_scores_toy_concepts():
    from engine.errors import UserError
    from engine.scoring.registry import build_judge, check_judges, parse_judge_ref
    from engine.specs.concepts import load_concept

    request = parse_judge_ref("toy")
    images, labels = render_dataset(2, seed=7)
    concepts = [load_concept(f"toy_{CONCEPTS[label]}") for label in labels]
    judge = build_judge(request, torch.device("cpu"))
    scores = judge.score(list(images), concepts)
    assert all(scores["judge_top1"]) and min(scores["judge_target_prob"]) > 0.5
    assert judge.model_id.startswith("toy:toy-judge-v1/file:judge.safetensors@")
    check_judges([request], {c.name: c for c in concepts})
    with pytest.raises(UserError, match=r"judge_classes\.toy"):
        check_judges([request], {"church": load_concept("church")})


def test_toy_judge_scores_a_batch_of_mixed_sizes_as_each_size_alone():
    # A score batch can hold whole images next to inpainting's cropped mask regions.
    from engine.toyworld.judge import load_toy_judge

    judge = load_toy_judge()
    images, _ = render_dataset(1, seed=3)
    whole = [np.asarray(image) for image in images[:3]]
    crops = [np.ascontiguousarray(np.asarray(image)[8:24, 8:24]) for image in images[3:5]]
    mixed = judge.classify(whole + crops)
    alone = np.concatenate([judge.classify(np.stack(whole)), judge.classify(np.stack(crops))])
    np.testing.assert_array_equal(mixed, alone)
