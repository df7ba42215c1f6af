"""Concept files, the original's prompt/seed list and sampling, run-config validation."""

from __future__ import annotations

import pytest

from engine.errors import UserError
from engine.specs.concepts import available_concepts, load_concept
from engine.specs.runs import apply_overrides, run_spec_from_dict

ORIGINAL_CONCEPTS = {
    "airliner", "cassette_player", "chainsaw", "church", "english_springer_spaniel", "french_horn",
    "garbage_truck", "golf_ball", "parachute", "tench", "van_gogh", "picasso", "andy_warhol",
}


def test_all_original_concepts_are_configured():
    assert set(available_concepts()) >= ORIGINAL_CONCEPTS


def test_seed_list_is_the_originals():
    seeds = load_concept("church").seed_list()
    assert len(seeds) == 500
    assert seeds[:5] == [1825, 410, 4507, 4013, 3658]  # random.seed(42); randint(1, 10000)
    assert len(set(seeds)) == 489


def test_sampling_reproduces_pandas_sample_random_state_42():
    # original-system.md §2.2: df.sample(10, random_state=42) on the church file
    rows = load_concept("church").sample_prompts(10)
    assert [i for i, _, _ in rows] == [361, 73, 374, 155, 104, 394, 377, 124, 68, 450]
    assert [s for _, _, s in rows] == [4534, 8752, 1233, 8006, 7020, 6659, 591, 8670, 3433, 728]
    thirty = load_concept("church").sample_prompts(30)
    assert thirty[:10] == rows  # the first 10 are a prefix of the first 30
    assert [s for _, _, s in thirty[10:14]] == [9675, 9076, 2609, 526]


def test_prompts_are_verbatim_and_classes_exact():
    assert load_concept("airliner").prompt == "a picture of a airliner"
    assert load_concept("van_gogh").prompt == "a painting in the style of Van Gogh"
    assert load_concept("chainsaw").judge_classes == {"imagenet": [491]}
    assert load_concept("english_springer_spaniel").judge_classes == {"imagenet": [217]}
    assert load_concept("picasso").judge_classes == {}
    assert load_concept("picasso").kind == "style"


def test_user_adds_a_concept_with_one_file(tmp_path, monkeypatch):
    (tmp_path / "concepts").mkdir()
    (tmp_path / "concepts" / "lighthouse.yaml").write_text(
        "kind: object\ndisplay_name: lighthouse\nprompt: a picture of a lighthouse\n"
        "clip_text: a photo of a lighthouse\njudge_classes: {imagenet: [437]}\nseeds: [3, 1, 2]\n"
    )
    monkeypatch.setenv("ENGINE_CONFIG_DIR", str(tmp_path))
    concept = load_concept("lighthouse")
    assert concept.seed_list() == [3, 1, 2]
    assert sorted(s for _, _, s in concept.sample_prompts(3)) == [1, 2, 3]
    with pytest.raises(UserError, match="has 3 prompt/seed rows"):
        concept.sample_prompts(4)


def test_misspelled_concept_key_names_it(tmp_path, monkeypatch):
    (tmp_path / "concepts").mkdir()
    (tmp_path / "concepts" / "bad.yaml").write_text(
        "kind: object\ndisplay_nme: x\nprompt: p\nclip_text: c\ndisplay_name: x\n"
    )
    monkeypatch.setenv("ENGINE_CONFIG_DIR", str(tmp_path))
    with pytest.raises(UserError, match="unknown key 'display_nme'"):
        load_concept("bad")


def test_unknown_concept_lists_choices():
    with pytest.raises(UserError, match=r"unknown concept 'churchh'.*church"):
        load_concept("churchh")


def test_run_spec_rejects_misspelled_key_with_valid_keys():
    with pytest.raises(UserError) as error:
        run_spec_from_dict({"output": "x", "concepts": ["church"], "probes": ["standard_prompt"],
                            "num_images": 1, "num_imgs": 3})
    assert "unknown key 'num_imgs'" in str(error.value)
    assert "num_images" in str(error.value)


def test_run_spec_rejects_zero_images():
    with pytest.raises(UserError, match="num_images"):
        run_spec_from_dict({"output": "x", "concepts": ["church"], "probes": ["standard_prompt"], "num_images": 0})


def test_overrides_parse_yaml_values_and_nest():
    data = apply_overrides({"a": {"b": 1}}, ["a.b=2", "a.c=[1, 2]", "d=1e-3"])
    assert data == {"a": {"b": 2, "c": [1, 2]}, "d": "1e-3"}  # PyYAML reads 1e-3 as a string
    with pytest.raises(UserError, match="key=value"):
        apply_overrides({}, ["novalue"])
