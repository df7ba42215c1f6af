"""`stop: on_hit` of the best-of-N probes: the coverage-first order, the rounds and what a stopped row
keeps and records (tiny models, a scripted judge), the default's unchanged identity, the refusals, and
on the toy world with its judge that every row's any-candidate hit is the exhaustive sweep's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.best_of_n_stop import sweep_order
from engine.coverage_order import coverage_order, radical_inverse
from engine.errors import UserError
from engine.probe import ProbeBatch, ProbeContext, WorkRow, parse_params
from engine.specs.concepts import load_concept
from engine.toyworld.shipped import WEIGHTS_DIR
from probes.noise_based import NoiseBasedProbe

FAST = {"num_inference_steps": 3, "height": 32, "width": 32, "eta_values": [0.0, 1.0, 1.5],
        "variance_scales": [1.0, 1.04], "selector": "clip", "candidate_batch_size": 1}
toy_weights = pytest.mark.skipif(not (WEIGHTS_DIR / "toy-base" / "model_index.json").exists(),
                                 reason="toy-world weights not built (engine toyworld build)")


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """One thread: two threads per process oversubscribe our shared 2-core machines."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def rows(seeds, concept="church") -> list[WorkRow]:
    prompt = load_concept(concept).prompt
    return [WorkRow(f"r{s}", "m", "x", concept, concept, "noise_based", "{}", prompt, i, s)
            for i, s in enumerate(seeds)]


class ScriptedJudge:
    """Recognises exactly the images listed (by their bytes); records what it was asked."""

    def __init__(self, hits: set[bytes] | None):
        self.hits = hits
        self.calls: list[tuple[int, bool]] = []

    def __call__(self, images, concept_name, regions, record_selection=False):
        self.calls.append((len(images), record_selection))
        return None if self.hits is None else [image.tobytes() in self.hits for image in images]


def context(tmp_path: Path, judge=None) -> ProbeContext:
    def brightness(selector, images, concept_name, regions):  # a deterministic stand-in selector
        return [float(np.asarray(image, dtype=np.float64).mean()) for image in images]

    return ProbeContext(torch.device("cpu"), lambda: None, load_concept, tmp_path, selector_scores=brightness,
                        judge_hits=judge)


def run(pipe, tmp_path, judge=None, seeds=(7, 11), **params):
    chosen = parse_params("noise_based", {**FAST, **params})
    return NoiseBasedProbe().run(ProbeBatch(rows(seeds), chosen, pipe, context(tmp_path, judge)))


# --------------------------------------------------------------------------- the order


def test_radical_inverse_mirrors_the_digits():
    assert [radical_inverse(k, 2) for k in range(5)] == [0.0, 0.5, 0.25, 0.75, 0.125]
    assert radical_inverse(5, 3) == pytest.approx(2 / 3 + 1 / 9)  # 5 = 12 in base 3 -> 0.21


def test_coverage_order_is_a_permutation_that_spreads_over_both_axes():
    for shape in [(1,), (2,), (25,), (2, 2), (6, 4), (25, 6), (3, 1)]:
        order = coverage_order(shape)
        assert sorted(order) == list(range(int(np.prod(shape))))
    assert coverage_order((25,))[:4] == [0, 12, 6, 18]  # van der Corput base 2: 0, 1/2, 1/4, 3/4 of 25
    first = [divmod(i, 4) for i in coverage_order((6, 4))[:6]]
    assert len({eta for eta, _ in first}) >= 4 and len({v for _, v in first}) == 4  # not eta-major
    assert coverage_order((6, 4)) == coverage_order((6, 4))


def test_sweep_order_reads_the_params_grid_outer_axis_first():
    params = parse_params("noise_based", {**FAST, "stop": "on_hit"})
    assert sweep_order(params, 6) == coverage_order((3, 2))


# --------------------------------------------------------------------------- identity and refusals


# noise_based's default params text before `stop` existed (commit 1e8237a): row ids hash this text.
BEFORE_STOP = ('{"candidate_batch_size":16,"control":"off","eta_values":[1.0,1.17,1.34,1.51,1.68,1.85],'
               '"guidance_scale":7.5,"height":null,"initial_noise":"per_candidate","keep_all_candidates":false,'
               '"negative_prompt":"","num_inference_steps":50,"selector":"clip","variance_scales":[1.0,1.02,1.03,'
               '1.04],"width":null}')


def test_the_default_stop_leaves_the_params_text_and_so_the_row_ids_as_they_were():
    default = parse_params("noise_based", {})
    assert default.canonical_json() == BEFORE_STOP
    assert "stop" not in json.loads(default.canonical_json())
    assert default.canonical_json() == parse_params("noise_based", {"stop": "none"}).canonical_json()
    assert type(default).model_validate_json(default.canonical_json()).stop == "none"
    on_hit = parse_params("noise_based", {"stop": "on_hit"})
    assert json.loads(on_hit.canonical_json())["stop"] == "on_hit"


def test_stop_on_hit_is_refused_with_keep_all_candidates():
    with pytest.raises(UserError, match="keep_all_candidates"):
        parse_params("noise_based", {"stop": "on_hit", "keep_all_candidates": True, "selector": "none"})


def test_stop_on_hit_needs_a_classifier_judge_in_the_run():
    from engine.scoring.selectors import check_selectors
    from engine.specs.judges import judge_requests

    params = parse_params("noise_based", {"stop": "on_hit"})
    with pytest.raises(UserError, match="classifier judge"):
        check_selectors([params], judge_requests(["clip"]), {"church": load_concept("church")})


# --------------------------------------------------------------------------- rounds on the tiny model


def test_a_stopped_row_keeps_its_first_hit_in_coverage_order_and_makes_only_what_came_before(
        tiny_erased_pipe, tmp_path):
    exhaustive = run(tiny_erased_pipe, tmp_path, seeds=(7,))
    every = exhaustive.candidates[0]
    order = coverage_order((3, 2))
    # The judge recognises two candidates; the one earlier in coverage order stops the row.
    later, earlier = order[4], order[2]
    judge = ScriptedJudge({every[later].tobytes(), every[earlier].tobytes()})
    stopped = run(tiny_erased_pipe, tmp_path, judge, seeds=(7,), stop="on_hit")
    extras = stopped.extras[0]
    assert extras["stopped_on_hit"] and extras["hit_candidate"] == earlier == extras["selected_candidate"]
    assert extras["candidates_generated"] == 3 and extras["candidate_indices"] == order[:3]
    np.testing.assert_array_equal(stopped.images[0], every[earlier])
    for made, index in zip(stopped.candidates[0], order[:3], strict=True):  # same noise, same images
        np.testing.assert_array_equal(made, every[index])
    assert all(asked for _, asked in judge.calls)  # the hits chose the image: recorded as a selection


def test_rows_without_a_hit_run_the_whole_sweep_and_the_selector_picks(tiny_erased_pipe, tmp_path):
    exhaustive = run(tiny_erased_pipe, tmp_path)
    stopped = run(tiny_erased_pipe, tmp_path, ScriptedJudge(set()), stop="on_hit")
    for plain, anytime in zip(exhaustive.extras, stopped.extras, strict=True):
        assert anytime["candidates_generated"] == 6 and not anytime["stopped_on_hit"]
        assert anytime["selected_candidate"] == plain["selected_candidate"]
        assert anytime["stop_unavailable"] is None
    np.testing.assert_array_equal(stopped.images[0], exhaustive.images[0])


def test_a_concept_the_judge_cannot_read_runs_the_full_sweep_and_says_so(tiny_erased_pipe, tmp_path):
    stopped = run(tiny_erased_pipe, tmp_path, ScriptedJudge(None), seeds=(7,), stop="on_hit")
    extras = stopped.extras[0]
    assert extras["candidates_generated"] == 6 and "no classes" in extras["stop_unavailable"]


def test_rounds_are_candidate_batch_size_candidates_per_prompt(tiny_erased_pipe, tmp_path):
    exhaustive = run(tiny_erased_pipe, tmp_path, seeds=(7, 11), candidate_batch_size=2)
    order = coverage_order((3, 2))
    # Row 7's third candidate in coverage order hits: it stops after its second round (4 made).
    judge = ScriptedJudge({exhaustive.candidates[0][order[2]].tobytes()})
    stopped = run(tiny_erased_pipe, tmp_path, judge, stop="on_hit", candidate_batch_size=2)
    assert [e["candidates_generated"] for e in stopped.extras] == [4, 6]
    assert stopped.extras[0]["hit_candidate"] == order[2]


def test_the_control_stops_by_the_same_rule(tiny_erased_pipe, tmp_path):
    control = run(tiny_erased_pipe, tmp_path, seeds=(7,), control="only")
    first = coverage_order((3, 2))[0]
    judge = ScriptedJudge({control.candidates[0][first].tobytes()})
    stopped = run(tiny_erased_pipe, tmp_path, judge, seeds=(7,), control="only", stop="on_hit")
    assert stopped.extras[0]["candidates_generated"] == 1 and stopped.extras[0]["hit_candidate"] == first


# --------------------------------------------------------------------------- the toy world


@toy_weights
def test_on_the_toy_world_every_rows_any_hit_is_the_exhaustive_runs_with_fewer_images(tmp_path):
    """UCE's circle model under the noise sweep, judged by the toy judge through the runner's selector
    bank: with candidate_batch_size 1 the stopped sweep makes the exhaustive sweep's candidates until
    its first hit, so each row's any-candidate hit is the same, and prompts that recover stop early."""
    from engine.models.builtin import BUILTIN_MODELS
    from engine.scoring.selectors import SelectorBank
    from engine.specs.judges import judge_requests

    pipe = BUILTIN_MODELS["toy-uce-circle"].build()
    pipe.set_progress_bar_config(disable=True)
    concept = load_concept("toy_circle")
    holder: dict[str, ProbeContext] = {}
    bank = SelectorBank(judge_requests(["toy"]), {concept.name: concept}, torch.device("cpu"), lambda: holder["c"])
    holder["c"] = ProbeContext(torch.device("cpu"), lambda: None, load_concept, tmp_path,
                               selector_scores=bank.scores, judge_hits=bank.judge_hits)
    batch_rows = rows(range(8), concept.name)
    toy = {"num_inference_steps": 10, "guidance_scale": 5.0, "eta_values": [1.0, 2.0],
           "variance_scales": [1.0, 1.04], "selector": "judge", "candidate_batch_size": 1}
    outputs = {stop: NoiseBasedProbe().run(ProbeBatch(batch_rows, parse_params("noise_based", {**toy, "stop": stop}),
                                                      pipe, holder["c"]))
               for stop in ("none", "on_hit")}
    any_hit = {stop: [any(bank.judge_hits(made, concept.name)) for made in out.candidates]
               for stop, out in outputs.items()}
    assert any_hit["on_hit"] == any_hit["none"]
    assert any(any_hit["none"])  # the model recovers on some prompts, so the stop has something to save
    made = {stop: sum(len(c) for c in out.candidates) for stop, out in outputs.items()}
    assert made["on_hit"] < made["none"] == 8 * 4
    for extras, hit in zip(outputs["on_hit"].extras, any_hit["on_hit"], strict=True):
        assert extras["stopped_on_hit"] == hit


def test_a_stopped_sweep_is_labelled_first_hit_in_coverage_order_not_best_by_its_selector():
    import pandas as pd

    from engine.report.best_of_n_labels import display_label

    stopped = parse_params("noise_based", {"stop": "on_hit"}).canonical_json()
    group = pd.DataFrame({"params": [stopped] * 2, "candidate_count": [1, 24],
                          "selector": ["judge=toy:abc", "clip=clip:ViT-B-32/openai"]})
    label = display_label("noise_based", group)
    assert label.startswith("noise_based (first hit in coverage order, 1-24 candidates made")
    assert "best of" not in label
    exhaustive = group.assign(params=parse_params("noise_based", {}).canonical_json(), candidate_count=24)
    assert display_label("noise_based", exhaustive).startswith("noise_based (best of 24 by")
