"""The adversarial-prompt probe's own properties: the simplex projection, the straight-through
sampler's gradient, that the attack lowers its loss on the toy world, that the random control reads
nothing from the attack, the stop rule, and what `engine plan` counts for it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.models.builtin import BUILTIN_MODELS
from engine.probe import ProbeBatch, ProbeContext, WorkRow, get_probe_class, parse_params, row_generator
from engine.specs.concepts import load_concept
from engine.toyworld.shipped import WEIGHTS_DIR
from probes.adversarial_prompt import (
    AdversarialPromptParams,
    AdversarialPromptProbe,
    StraightThroughOneHot,
    _Attack,
    allowed_token_ids,
    project_to_simplex,
)

FAST = {"num_inference_steps": 3, "height": 32, "width": 32, "timesteps": [700, 400, 100], "iterations": 2,
        "max_images": 3}
toy_weights = pytest.mark.skipif(not (WEIGHTS_DIR / "toy-base" / "model_index.json").exists(),
                                 reason="toy-world weights not built (engine toyworld build)")


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """One thread, as the conformance suite: two threads per process oversubscribe a shared 2-core
    machine and make these small models many times slower. Restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def rows(concept: str = "church", seeds=(11, 12)) -> list[WorkRow]:
    prompt = load_concept(concept).prompt
    return [WorkRow(f"r{seed}", "tiny-erased", "test", concept, concept, "adversarial_prompt", "{}", prompt, i, seed)
            for i, seed in enumerate(seeds)]


def context(tmp_path, base=None, judge_hits=None) -> ProbeContext:
    def no_base():
        raise AssertionError("the base model was asked for")

    return ProbeContext(device=torch.device("cpu"), base_pipeline=(lambda: base) if base is not None else no_base,
                        concept=load_concept, cache_dir=tmp_path, judge_hits=judge_hits)


# --------------------------------------------------------------------------- the pieces


def test_simplex_projection_sums_to_one_and_is_non_negative():
    values = torch.randn(64, 50, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    projected = project_to_simplex(values)
    assert (projected >= 0).all()
    torch.testing.assert_close(projected.sum(-1), torch.ones(64, dtype=torch.float64))
    # the hand-known case: equal entries become uniform; a dominant entry takes everything
    torch.testing.assert_close(project_to_simplex(torch.tensor([[0.5, 0.5, 0.5]])), torch.full((1, 3), 1 / 3))
    torch.testing.assert_close(project_to_simplex(torch.tensor([[5.0, 0.0, -1.0]])), torch.tensor([[1.0, 0.0, 0.0]]))


def test_simplex_projection_is_the_identity_on_the_simplex():
    points = torch.distributions.Dirichlet(torch.ones(7)).sample((32,)).double()
    torch.testing.assert_close(project_to_simplex(points), points)
    vertex = torch.eye(5, dtype=torch.float64)
    torch.testing.assert_close(project_to_simplex(vertex), vertex)


def test_simplex_projection_is_the_nearest_point():
    """No random point of the simplex is nearer to the input than its projection."""
    value = torch.tensor([0.9, 0.4, -0.3, 0.2], dtype=torch.float64)
    projected = project_to_simplex(value.unsqueeze(0))[0]
    others = torch.distributions.Dirichlet(torch.ones(4)).sample((2000,)).double()
    assert ((others - value).norm(dim=-1) >= (projected - value).norm() - 1e-12).all()


def test_straight_through_one_hot_forward_and_clipped_gradient():
    distributions = torch.full((2, 4), 0.25, requires_grad=True)
    one_hot = StraightThroughOneHot.apply(distributions, torch.tensor([2, 0]))
    assert one_hot.tolist() == [[0, 0, 1, 0], [1, 0, 0, 0]]
    weights = torch.tensor([[3.0, -0.5, 0.2, -7.0], [0.1, 1.0, -1.5, 0.0]])
    (one_hot * weights).sum().backward()
    # d(sum)/d(one_hot) = weights, passed straight through and clipped to [-1, 1]
    torch.testing.assert_close(distributions.grad, torch.tensor([[1.0, -0.5, 0.2, -1.0], [0.1, 1.0, -1.0, 0.0]]))


def test_allowed_tokens_leave_out_the_specials(tiny_erased_pipe):
    allowed = set(allowed_token_ids(tiny_erased_pipe).tolist())
    assert not allowed & set(tiny_erased_pipe.tokenizer.all_special_ids)
    assert len(allowed) == len(tiny_erased_pipe.tokenizer) - len(set(tiny_erased_pipe.tokenizer.all_special_ids))


def test_plan_counts_the_attack_budget():
    probe = AdversarialPromptProbe()
    params = parse_params("adversarial_prompt", {"timesteps": [900, 500, 100], "iterations": 7, "max_images": 2})
    assert probe.images_per_row(params) == 1 + 2  # the plain check and min(max_images, timesteps)
    assert probe.row_optimisation_passes(params) == 2 * 7
    control = params.model_copy(update={"mode": "random"})
    assert probe.images_per_row(control) == 3 and probe.row_optimisation_passes(control) == 0
    assert probe.controls(control) == "adversarial_prompt" and probe.controls(params) is None
    assert probe.base_reference_requests(rows()[0], None, control) == []
    defaults = AdversarialPromptParams()
    assert defaults.timesteps == list(range(10, 1000, 20)) and len(defaults.timesteps) == 50
    budget = (defaults.num_tokens, defaults.iterations, defaults.learning_rate, defaults.weight_decay)
    assert budget == (3, 40, 0.01, 0.1)


def test_timesteps_out_of_range_are_refused():
    from engine.errors import UserError

    with pytest.raises(UserError, match="timesteps"):
        parse_params("adversarial_prompt", {"timesteps": [1000]})


# --------------------------------------------------------------------------- the attack on the toy world


@toy_weights
def test_attack_lowers_the_loss_of_its_argmax_tokens_on_the_toy_world():
    """At a fixed (t, noise), the argmax tokens after the optimisation denoise the base model's image
    of the prompt better than the argmax tokens before it (uniform start: the first allowed token)."""
    torch.manual_seed(0)
    erased = BUILTIN_MODELS["toy-esdx-circle"].build()
    base = BUILTIN_MODELS["toy-base"].build()
    for pipe in (erased, base):
        pipe.set_progress_bar_config(disable=True)
    params = parse_params("adversarial_prompt", {"num_inference_steps": 25, "guidance_scale": 5.0,
                                                 "timesteps": [400], "iterations": 30})
    row = WorkRow("r", "toy-esdx-circle", "esd-x", "toy_circle", "toy_circle", "adversarial_prompt", "{}",
                  "a picture of a circle", 0, 1000)
    target = base(prompt=[row.prompt], num_inference_steps=25, guidance_scale=5.0,
                  generator=[row_generator(row.seed)], output_type="np").images[0]
    target = (np.clip(target, 0, 1) * 255).round().astype(np.uint8)
    attack = _Attack(erased, params, row, target, allowed_token_ids(erased), row_generator(row.seed, "test"))
    noise = torch.randn(attack.x0.shape, generator=torch.Generator().manual_seed(5))

    def argmax_loss() -> float:
        indices = attack.distributions.detach().argmax(-1)
        with torch.no_grad():
            return float(attack.loss(400, indices, noise))

    before = argmax_loss()
    attack.optimise(400)
    after = argmax_loss()
    assert attack.steps == 30 and len(attack.losses) == 30
    assert after < before
    simplex = attack.distributions.detach()
    assert (simplex >= 0).all() and torch.allclose(simplex.sum(-1), torch.ones(simplex.shape[0]))


# --------------------------------------------------------------------------- the control and the stop rule


def test_random_control_reads_nothing_from_the_attack(tiny_erased_pipe, tiny_pipe, tmp_path):
    """The control asks for no base model or reference, and its rows come out the same whether or
    not attack rows ran before it in the same process."""
    probe = AdversarialPromptProbe()
    control = parse_params("adversarial_prompt", {**FAST, "mode": "random"})
    attack = parse_params("adversarial_prompt", {**FAST, "timesteps": [500], "max_images": 1})
    alone = probe.run(ProbeBatch(rows(), control, tiny_erased_pipe, context(tmp_path / "a")))
    probe.run(ProbeBatch(rows(), attack, tiny_erased_pipe, context(tmp_path / "b", base=tiny_pipe)))
    after_attack = probe.run(ProbeBatch(rows(), control, tiny_erased_pipe, context(tmp_path / "b", base=tiny_pipe)))
    for first, second in zip(alone.images, after_attack.images, strict=True):
        np.testing.assert_array_equal(first, second)
    assert alone.extras == after_attack.extras
    for extra in alone.extras:
        assert extra["mode"] == "random" and extra["optimisation_steps"] == 0 and extra["images_made"] == 1 + 3
        assert len(extra["adversarial_token_ids"]) == 3


class ScriptedJudge:
    """A judge that answers from a script, one answer per image in call order (the probe's stop rule
    is under test here, not the judge), recording what it was asked."""

    def __init__(self, answers: list[bool]):
        self.answers, self.images, self.selections = list(answers), [], []

    def __call__(self, images, concept_name, regions, record_selection=False):
        self.images.extend(images)
        self.selections.append(record_selection)
        return [self.answers.pop(0) if self.answers else False for _ in images]


@pytest.mark.parametrize("mode", ["attack", "random"])
def test_stop_on_success_keeps_the_first_recognised_image(mode, tiny_erased_pipe, tiny_pipe, tmp_path):
    probe = AdversarialPromptProbe()
    row = rows(seeds=(21,))
    stop = parse_params("adversarial_prompt", {**FAST, "mode": mode})
    judge = ScriptedJudge([False, False, True, False])  # plain miss, image 1 miss, image 2 hit
    output = probe.run(ProbeBatch(row, stop, tiny_erased_pipe, context(tmp_path, base=tiny_pipe, judge_hits=judge)))
    extra = output.extras[0]
    assert extra["images_made"] == 3 and extra["success_image"] == 2 and extra["judged"]
    np.testing.assert_array_equal(output.images[0], judge.images[2])  # the kept image is the recognised one
    assert all(judge.selections)  # the judge chose the row's image: recorded as a selection
    if mode == "attack":
        assert extra["optimisation_steps"] == 2 * FAST["iterations"]
        assert extra["loss_first"] is not None and extra["loss_last"] is not None

    keep_going = stop.model_copy(update={"stop_on_success": False})
    judge = ScriptedJudge([False, False, True, False])
    output = probe.run(ProbeBatch(row, keep_going, tiny_erased_pipe,
                                  context(tmp_path, base=tiny_pipe, judge_hits=judge)))
    extra = output.extras[0]
    assert extra["images_made"] == 1 + 3 and extra["success_image"] == 2
    np.testing.assert_array_equal(output.images[0], judge.images[-1])  # the last image, not a judged pick
    assert not any(judge.selections)


def test_a_plain_prompt_success_is_not_attacked(tiny_erased_pipe, tiny_pipe, tmp_path):
    probe = AdversarialPromptProbe()
    judge = ScriptedJudge([True])
    params = parse_params("adversarial_prompt", FAST)
    output = probe.run(ProbeBatch(rows(seeds=(31,)), params, tiny_erased_pipe,
                                  context(tmp_path, base=tiny_pipe, judge_hits=judge)))
    extra = output.extras[0]
    assert extra["plain_prompt_success"] is True and extra["images_made"] == 1
    assert extra["optimisation_steps"] == 0 and extra["adversarial_token_ids"] == []
    standard = get_probe_class("standard_prompt")().run(ProbeBatch(
        rows(seeds=(31,)), parse_params("standard_prompt", {k: FAST[k] for k in ("num_inference_steps", "height",
                                                                                 "width")}),
        tiny_erased_pipe, context(tmp_path)))
    np.testing.assert_array_equal(output.images[0], standard.images[0])  # the plain prompt is the standard probe's


@toy_weights
def test_judge_hits_record_a_selection_only_when_asked(tmp_path):
    """The runner's judge-hit API with the toy judge: a probe that keeps an image because of the hits
    (record_selection) gets `judge=<model id>` in its rows' selector column; a plain question does not."""
    from engine.scoring.selectors import SelectorBank
    from engine.specs.judges import judge_requests

    bank = SelectorBank(judge_requests(["toy"]), {"toy_circle": load_concept("toy_circle")}, torch.device("cpu"),
                        lambda: context(tmp_path))
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    assert len(bank.judge_hits([image], "toy_circle", [None])) == 1
    assert bank.take_used() == {}
    bank.judge_hits([image], "toy_circle", [None], record_selection=True)
    assert bank.take_used()["toy_circle"].startswith("judge=toy:")
