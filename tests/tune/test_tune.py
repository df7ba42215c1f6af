"""`engine tune` on the tiny model: trials.parquet, the best config through `engine run`,
determinism, pipeline reuse, early stopping, and bad search spaces rejected before any trial."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

import engine.tune.execute
from engine.cli import app
from engine.results import read_rows
from engine.specs.concepts import load_concept
from engine.tune.pairs import held_out_indices, held_out_prompts
from engine.tune.progress import TrialBoard

runner = CliRunner()
# Two prompts, two denoising steps: a trial takes well under a second once the pipeline is loaded.
FAST = ["--num-images", "2", "--set", "params.num_inference_steps=2"]


def _tune(*args):
    result = runner.invoke(app, ["tune", *args])
    assert result.exit_code == 0, result.output
    return result


def _trials(output):
    return pq.read_table(output / "trials.parquet").to_pandas().sort_values("trial_index").reset_index(drop=True)


@pytest.fixture(scope="module")
def tpe_search(tmp_path_factory, ray_session):
    """4 TPE trials of the noise-based probe on one actor (max_concurrent_trials=1)."""
    output = tmp_path_factory.mktemp("tune") / "noise"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ENGINE_PROGRESS_SECONDS", "0.2")  # progress lines (the output is not a terminal)
        result = _tune("--probe", "noise_based", "--model", "tiny", "--concept", "church", "--num-samples", "4",
                       "--objective", "judge_target_prob", "--output", str(output), *FAST,
                       "--set", "max_concurrent_trials=1", "--set", "seed=3")
    return output, result


def test_search_writes_one_row_per_trial(tpe_search):
    output, result = tpe_search
    trials = _trials(output)
    assert len(trials) == 4 and set(trials.status) == {"complete"}
    assert set(trials.model) == {"tiny"} and set(trials.concept) == {"church"} and set(trials.probe) == {"noise_based"}
    assert (trials.n == 2).all() and (trials.images_scored == 2).all() and trials.error.isna().all()
    assert ((trials.ci_low <= trials.objective) & (trials.objective <= trials.ci_high)).all()
    assert trials.param_eta.between(0, 3).all() and trials.param_variance_scale.between(0.9, 1.2).all()
    assert len(set(trials.param_eta)) == 4  # four distinct settings were tried
    for row in trials.itertuples():
        params = json.loads(row.params)
        # Each trial measures one setting: a one-value sweep, no best-of-N selection.
        assert params["eta_values"] == [row.param_eta] and params["variance_scales"] == [row.param_variance_scale]
        assert params["num_inference_steps"] == 2
        assert row.target_prob_mean == pytest.approx(row.objective)
    best = trials.loc[trials.objective.idxmax()]
    assert f"in-sample search maximum (biased upward): judge_target_prob {best.objective:.4g}" in result.output
    assert "held-out judge_target_prob" in result.output


def test_progress_shows_trials_done_and_best_so_far(tpe_search):
    output, result = tpe_search
    lines = [line for line in result.output.splitlines() if line.startswith("tune: ")]
    best = _trials(output).objective.max()
    assert lines and lines[-1].startswith("tune: 4/4 trials (100%)")
    assert lines[-1].endswith(f"best in-sample tiny x church {best:.4g}")


def test_trial_board_counts_trials_and_keeps_the_best():
    board = TrialBoard()
    assert board.status() == (0, "")
    board.trial_finished("a x c", 0.25)
    board.trial_finished("a x c", None)  # stopped early or failed: counted, never the best
    board.trial_finished("a x c", 0.5)
    board.trial_finished("b x c", float("nan"))
    assert board.status() == (4, "best in-sample a x c 0.5")


def test_pipeline_loads_once_across_trials(tpe_search):
    """The reused actor keeps its pipelines: one load, one process, later trials skip the set-up."""
    trials = _trials(tpe_search[0])
    assert trials.pipeline_loaded.sum() == 1 and trials.worker_pid.nunique() == 1
    assert sorted(trials.process_trial_index) == [1, 2, 3, 4]
    first = trials[trials.process_trial_index == 1].iloc[0]
    later = trials[trials.process_trial_index > 1]
    assert first.pipeline_loaded and first.setup_seconds > 0.05
    assert (later.setup_seconds < 0.01).all()
    assert "1 pipeline load(s)" in tpe_search[1].output


def test_best_config_is_the_best_trials_setting_on_the_held_out_prompts(tpe_search):
    """The best YAML runs the best trial's one setting on the held-out prompts (that `engine run` of
    it re-measures the held-out estimate: test_an_erased_model_is_tuned_on_what_it_erased_with_a_held_out_rate)."""
    output, _ = tpe_search
    trials = _trials(output)
    best = trials.loc[trials.objective.idxmax()]
    data = yaml.safe_load((output / "best_tiny_church.yaml").read_text())
    params = data["probes"][0]["params"]
    assert params["eta_values"] == [best.param_eta] and params["variance_scales"] == [best.param_variance_scale]
    assert data["prompt_indices"] == held_out_indices(load_concept("church"), 2)  # the held-out prompts
    assert data["num_images"] == 2 and data["models"] == ["tiny"] and data["concepts"] == ["church"]


@pytest.mark.slow
def test_same_params_same_metric_and_pairs_searched_together(tmp_path, ray_session):
    """A grid with one point listed twice, over two (model, concept) pairs searched together: the
    second trial on the reused actor measures exactly what the first did (no state leaks between
    trials), and each pair's actor serves only its own model. (`engine run` of a best config re-measures
    its held-out estimate: test_an_erased_model_is_tuned_on_what_it_erased_with_a_held_out_rate.)"""
    config = tmp_path / "cfg.yaml"
    config.write_text(
        "probe: standard_prompt\nconcepts: [church]\nmodels: [tiny, tiny-erased]\nnum_images: 2\n"
        "params: {num_inference_steps: 2}\nspace:\n  guidance_scale: {low: 1, high: 20, grid: [3.0, 3.0]}\n"
        "algorithm: grid\nobjective: clip_score\nmax_concurrent_trials: 1\n"
    )
    _tune(str(config), "--output", str(tmp_path / "out"), "--cluster", "auto")
    trials = _trials(tmp_path / "out")
    assert sorted(trials.model) == ["tiny", "tiny", "tiny-erased", "tiny-erased"]
    for _, pair in trials.groupby("model"):
        assert pair.param_guidance_scale.tolist() == [3.0, 3.0]
        assert pair.pipeline_loaded.sum() == 1 and pair.worker_pid.nunique() == 1
        assert pair.objective.iloc[0] == pair.objective.iloc[1]
        assert pair.clip_mean.iloc[0] == pair.clip_mean.iloc[1]
    assert trials.worker_pid.nunique() == 2
    assert trials.groupby("model").objective.first().nunique() == 2  # the two models differ
    assert (tmp_path / "out" / "best_tiny_church.yaml").exists()
    assert (tmp_path / "out" / "best_tiny-erased_church.yaml").exists()


@pytest.mark.slow
def test_asha_stops_trials_on_images_scored(tmp_path, ray_session):
    """Trials report after each batch; ASHA may stop one after `grace_period` images, and only
    trials that scored every image can be the best."""
    _tune("--probe", "standard_prompt", "--model", "tiny", "--concept", "church", "--num-samples", "4",
          "--algorithm", "random", "--objective", "clip_score", "--output", str(tmp_path / "asha"),
          "--num-images", "4", "--set", "params.num_inference_steps=2", "--set", "batch_size=1",
          "--set", "scheduler={name: asha, grace_period: 1, reduction_factor: 2}", "--set", "max_concurrent_trials=1")
    trials = _trials(tmp_path / "asha")
    assert set(trials.status) == {"complete", "stopped"}  # fixed seeds: the same trials stop every time
    assert (trials[trials.status == "stopped"].images_scored < 4).all()
    assert (trials[trials.status == "complete"].n == 4).all()
    best = yaml.safe_load((tmp_path / "asha" / "best_tiny_church.yaml").read_text())
    complete = trials[trials.status == "complete"]
    top = complete.loc[complete.objective.idxmax()]
    assert best["probes"][0]["params"]["guidance_scale"] == top.param_guidance_scale


@pytest.mark.slow
def test_an_erased_model_is_tuned_on_what_it_erased_with_a_held_out_rate(tmp_path, ray_session):
    """No --concept: the toy model is searched on the shape it erased (recovery), and the best
    setting is re-run on as many other prompts, whose seeds no trial used."""
    output = tmp_path / "toy"
    result = _tune("--probe", "standard_prompt", "--model", "toy-esdx-circle", "--num-samples", "2",
                   "--algorithm", "random", "--output", str(output), *FAST, "--set", "judges=[toy]",
                   "--set", "max_concurrent_trials=1")
    trials = _trials(output)
    assert set(trials.concept) == {"toy_circle"} and set(trials.role) == {"recovery"}
    assert set(trials.method) == {"esd-x"}
    best = trials[trials.is_best.astype(bool)]
    assert len(best) == 1 and trials[~trials.is_best.astype(bool)].heldout_n.isna().all()
    row = best.iloc[0]
    assert row.objective == trials.objective.max()
    assert row.heldout_n == row.n == 2 and row.heldout_ci_low <= row.heldout_objective <= row.heldout_ci_high
    searched = {seed for _, _, seed in load_concept("toy_circle").sample_prompts(2)}
    held_out = set(json.loads(row.heldout_seeds))
    assert len(held_out) == 2 and not held_out & searched
    assert "held-out judge_top1" in result.output and "in-sample search maximum" in result.output
    config = output / "best_toy-esdx-circle_toy_circle.yaml"
    assert "# held-out estimate" in config.read_text() and "# in-sample search maximum" in config.read_text()
    # `engine run` of the best config makes the held-out rows and measures the held-out estimate again.
    run = runner.invoke(app, ["run", str(config)])
    assert run.exit_code == 0, run.output
    rows = read_rows(output / "best_toy-esdx-circle_toy_circle").to_pandas()
    assert set(rows.seed) == held_out and rows.judge_top1.mean() == pytest.approx(row.heldout_objective)


def test_held_out_prompts_skip_seeds_the_search_used():
    church = load_concept("church")  # the original's 500 seeds repeat some values
    searched = church.sample_prompts(100)
    held_out = held_out_prompts(church, 100)
    assert len(held_out) == 100 and not {s for _, _, s in held_out} & {s for _, _, s in searched}
    order = [i for i, _, _ in church.sample_prompts(500)]
    assert [i for i, _, _ in held_out] == sorted((i for i, _, _ in held_out), key=order.index)  # sampling order


# --------------------------------------------------------------------------- bad input


@pytest.fixture
def no_search(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the search started despite a bad search space")

    monkeypatch.setattr(engine.tune.execute, "execute_tune", fail)


@pytest.mark.parametrize(
    "space, expected",
    [
        ("etta: {low: 0, high: 3}", "unknown key space.etta for probe noise_based; valid keys: "),
        ("eta: {low: 3, high: 0}", "space.eta: low 3 > high 0"),
        ("eta: {distribution: loguniform, low: 0, high: 3}", "space.eta: a loguniform range needs low > 0"),
        ("eta: {distribution: gauss, low: 0, high: 3}", "unknown distribution 'gauss'; valid choices: choice, int"),
        ("eta: {low: -1, high: 3}", "invalid params at eta=-1"),
        ("num_inference_steps: {distribution: uniform, low: 1, high: 9}", "is an integer; use distribution int"),
        ("num_inference_steps: {low: 1.5, high: 9}", "int bounds must be whole numbers (got 1.5, 9)"),
        ("selector: {low: 0, high: 1}", "'selector' is not a number; search it with distribution choice"),
    ],
)
def test_bad_search_space_exits_2_with_one_line(tmp_path, no_search, space, expected):
    config = tmp_path / "bad.yaml"
    config.write_text(f"probe: noise_based\nparams: {{keep_all_candidates: true}}\nspace:\n  {space}\n")
    result = runner.invoke(app, ["tune", str(config), "--model", "tiny", "--concept", "church",
                                 "--num-images", "1", "--output", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--probe", "noise_based", "--objective", "judge_top1", "--concept", "van_gogh"],
         "concept 'van_gogh' has no judge_classes.imagenet"),
        (["--probe", "noise_based", "--algorithm", "bayes"], "algorithm: Input should be 'tpe', 'random' or 'grid'"),
        (["--probe", "interference"], "no search space for probe 'interference' in configs/tune/"),
        (["--probe", "noise_based", "--set", "scheduler={name: asha, grace_period: 5}"],
         "grace_period 5 must be below the images per trial (1)"),
        # An erased model's objective is recovery of what it erased.
        (["--probe", "standard_prompt", "--model", "toy-esdx-circle", "--concept", "toy_square"],
         "'toy-esdx-circle' erased toy_circle, none of the concepts to tune (toy_square)"),
        (["--probe", "standard_prompt", "--model", "toy-esdx-circle", "--concept", "toy_circle", "--num-images", "60",
          "--set", "judges=[toy]"], "concept 'toy_circle' has 40 prompts beyond the search's 60"),
    ],
)
def test_bad_tune_request_exits_2(tmp_path, no_search, args, expected):
    defaults = {"--model": "tiny", "--concept": "church", "--num-images": "1", "--output": str(tmp_path / "o")}
    extra = [item for flag, value in defaults.items() if flag not in args for item in (flag, value)]
    result = runner.invoke(app, ["tune", *args, *extra])
    assert result.exit_code == 2, result.output
    assert expected in result.output and "Traceback" not in result.output


def test_every_shipped_search_space_matches_its_probe():
    from engine.specs.files import find_config_files
    from engine.tune.space import load_tune_spec, parse_space

    files = find_config_files("tune")
    assert {"noise_based", "standard_prompt", "classifier_guidance", "diffusion_completion", "inpainting"} <= set(files)
    for name, path in files.items():
        for algorithm in ("tpe", "grid"):
            spec, where = load_tune_spec(path, {"output": "unused", "algorithm": algorithm})
            space = parse_space(spec, where)
            assert spec.probe == name and space.dimensions
