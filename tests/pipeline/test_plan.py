"""`engine plan`: its counts against a hand computation on a small grid, the paper grid planned
without loading a model or touching the network, and the GPU-hour arithmetic."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

import engine.models.loading
from engine.cli import app
from engine.pipeline.grid import expand_run
from engine.pipeline.plan import ENGINE_TFLOPS, ORIGINAL_TFLOPS, estimate
from engine.specs.runs import RunSpec, load_run_file

runner = CliRunner()


@pytest.fixture(autouse=True)
def no_model_loads(monkeypatch):
    """Planning never loads a pipeline."""

    def refuse(*args, **kwargs):
        raise AssertionError("engine plan loaded a model")

    monkeypatch.setattr(engine.models.loading, "load_base_pipeline", refuse)
    monkeypatch.setattr(engine.models.loading, "load_unet", refuse)


def small_grid(tmp_path) -> RunSpec:
    return RunSpec(
        output=str(tmp_path / "out"),
        base_model="tiny",
        models=[
            "tiny",
            {"name": "e1", "pretrained": "tiny-erased", "method": "m", "erased": ["church"]},
            {"name": "hub", "pretrained": "org/not-cached", "method": "x", "erased": ["golf_ball"]},
        ],
        concepts=["church", "golf_ball"],
        probes=[
            {"name": "standard_prompt", "params": {"num_inference_steps": 3}},
            {"name": "noise_based", "params": {"num_inference_steps": 4, "eta_values": [1.0, 1.5],
                                               "variance_scales": [1.0]}},
            {"name": "interference", "params": {"num_inference_steps": 3, "guidance_scale": 1.0}},
            {"name": "textual_inversion", "params": {"num_inference_steps": 2, "max_train_steps": 5,
                                                     "gradient_accumulation_steps": 2, "num_reference_images": 3}},
            {"name": "inpainting", "params": {"num_inference_steps": 3}},
        ],
        num_images=2,
    )


def test_counts_match_a_hand_computation(tmp_path):
    cost = estimate(expand_run(small_grid(tmp_path), strict=False))
    # Rows. tiny (the base, DDIM) runs both concepts under standard, noise and inpainting (2 x 2
    # each), and interference's reference on the 13 real concepts (the listed two and every
    # target of the erased models' interference), 2 prompts each. e1 and hub run their erased
    # concept under the recovery probes (2 rows each) and interference on the 12 others (24).
    assert cost.row_counts == {
        "tiny": {"standard_prompt": 4, "noise_based": 4, "interference": 26, "textual_inversion": 0, "inpainting": 4},
        "e1": {"standard_prompt": 2, "noise_based": 2, "interference": 24, "textual_inversion": 2, "inpainting": 2},
        "hub": {"standard_prompt": 2, "noise_based": 2, "interference": 24, "textual_inversion": 2, "inpainting": 2},
    }
    # UNet evaluations: guided steps count 2; the pipeline-scheduler probes step hub's PNDM
    # (assumed: its config is not cached) n + 1 times; noise_based runs its own DDIM loop.
    by_probe = {name: (w.rows, w.images, w.unet_evals) for name, w in cost.by_probe.items()}
    assert by_probe["standard_prompt"] == (8, 8, 4 * 3 * 2 + 2 * 3 * 2 + 2 * 4 * 2)
    assert by_probe["noise_based"] == (8, 16, 8 * 2 * 4 * 2)  # 2 candidates per row
    assert by_probe["interference"] == (74, 74, 26 * 3 + 24 * 3 + 24 * 4)  # guidance 1: no second half
    assert by_probe["inpainting"] == (8, 8, 4 * 3 * 2 + 2 * 3 * 2 + 2 * 4 * 2)
    assert by_probe["textual_inversion"] == (4, 4, 2 * 2 * 2 + 2 * 3 * 2)
    # Textual inversion trains one embedding per (model, concept): 5 steps x 2 micro-batches of 1.
    ti = cost.by_probe["textual_inversion"]
    assert (ti.ti_trainings, ti.ti_passes) == (2, 2 * 5 * 2)
    # Base-model references, made once: inpainting's 2 prompts of each concept at 3 steps, and
    # textual inversion's 3 prompts of each at 2 steps (other settings, so not shared).
    assert (cost.references.images, cost.references.unet_evals) == (4 + 6, 4 * 3 * 2 + 6 * 2 * 2)
    assert (cost.total.rows, cost.total.images) == (102, 8 + 16 + 74 + 8 + 4 + 10)
    assert cost.model_loads == 3
    assert [(h.repo_id, h.cached) for h in cost.hub_models] == [("org/not-cached", False)]
    assert cost.total.tflop is None  # the tiny built-ins are not costed


def test_gpu_hours_follow_the_cost_model(tmp_path):
    spec = RunSpec(output=str(tmp_path), base_model="sd14-random", models=["sd14-random"], concepts=["church"],
                   probes=[{"name": "standard_prompt", "params": {"num_inference_steps": 50}}], num_images=10)
    cost = estimate(expand_run(spec, strict=False))
    # 10 images x 51 PNDM calls x 2 halves x 0.8033 TFLOP + 10 decodes x 2.5145 + 20 prompt encodings x 0.0133
    tflop = 10 * 51 * 2 * 0.8033 + 10 * 2.5145 + 20 * 0.0133
    assert cost.total.unet_evals == 10 * 51 * 2 and cost.total.tflop == pytest.approx(tflop)
    for gpu in ("h100", "a100", "a6000"):
        assert cost.gpu_hours(gpu) == pytest.approx(tflop / ENGINE_TFLOPS[gpu] / 3600)
        assert cost.gpu_hours(gpu, original=True) == pytest.approx(tflop / ORIGINAL_TFLOPS[gpu] / 3600)
    # The original's README: about 2 s per 50-step image on an A6000.
    assert cost.gpu_hours("a6000", original=True) * 3600 / 10 == pytest.approx(2.0, rel=0.05)


def test_the_paper_grid_plans_offline_without_loading_anything(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    grid = expand_run(load_run_file(Path(__file__).resolve().parents[2] / "configs/runs/paper.yaml"), strict=False)
    cost = estimate(grid)
    assert len(grid.models) == 92 and grid.models[0].name == "sd14"
    # The noise sweeps run with their best-of-N control (`control: also`): twice the rows.
    per_erased = {"standard_prompt": 30, "classifier_guidance": 30, "noise_based": 60,
                  "noise_classifier_guidance": 60, "diffusion_completion": 90, "interference": 360,
                  "inpainting": 30, "textual_inversion": 30, "adversarial_prompt": 60}  # attack + its control
    assert cost.row_counts["uce_church"] == per_erased
    assert cost.row_counts["sd14"] == {**{p: 0 for p in per_erased}, "standard_prompt": 390, "noise_based": 780,
                                       "interference": 390, "inpainting": 390}
    assert len(grid.rows) == 91 * 750 + 5 * 390
    # The original's sweeps: 24 noise candidates, 25 guidance scales, 150 noise x guidance pairs; each
    # control makes as many candidates again.
    assert cost.by_probe["noise_classifier_guidance"].images == 2 * 91 * 30 * 150
    assert cost.by_probe["noise_based"].images == 2 * (91 + 13) * 30 * 24
    # The adversarial prompt's upper bound: the plain check + 50 images per row (attack and control),
    # 50 timesteps x 40 Adam steps of UNet forward + backward per attack row.
    assert cost.by_probe["adversarial_prompt"].images == 91 * 30 * 2 * 51
    assert cost.by_probe["adversarial_prompt"].row_passes == cost.total.row_passes == 91 * 30 * 50 * 40
    assert len(cost.hub_models) == 92
    assert any("latent classifier" in note for note in cost.notes)  # a prerequisite, listed not raised


def test_engine_plan_prints_the_plan(tmp_path):
    config = tmp_path / "grid.yaml"
    config.write_text(
        "output: unused\nbase_model: sd14-random\nmodels: [sd14-random, {name: e, pretrained: org/e, method: esdx, "
        "erased: [church]}]\nconcepts: [church]\nprobes: [standard_prompt]\nnum_images: 3\n"
    )
    result = runner.invoke(app, ["plan", str(config), "--gpu", "a100"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("6 rows (recovery 3, base 3) for 2 model(s) x 1 probe(s):")
    assert "MISSING  org/e" in result.output
    assert "estimated GPU-hours on one A100" in result.output and "this engine" in result.output
    bad = runner.invoke(app, ["plan", str(config), "--gpu", "v100"])
    assert bad.exit_code == 2 and "valid choices: h100, a100, a6000" in bad.output
