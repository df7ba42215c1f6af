"""`--track mlflow` and `--track wandb`, together as a user would ask for both: a local MLflow store
(SQLite in tmp_path) and W&B's offline folder (in tmp_path, read back from W&B's own log) each hold
an `engine run` with its config, counts, recovery-table metrics and report, and an `engine tune`
search as one tracker run per trial; a tracker that cannot run is one error line before any work."""

from __future__ import annotations

import pandas as pd
import pytest
from typer.testing import CliRunner

from engine.cli import app
from engine.tracking.mlflow_run import flat_params
from engine.tracking.run_record import metric_key

mlflow = pytest.importorskip("mlflow")
runner = CliRunner()


@pytest.fixture
def store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # a SQLite store keeps artifacts in ./mlruns
    mlflow.set_tracking_uri(uri)
    yield mlflow.MlflowClient(uri)
    mlflow.set_tracking_uri(None)


def _runs(client, experiment):
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment}"
    return client.search_runs([found.experiment_id])


@pytest.mark.slow
def test_a_paired_run_is_logged_with_config_counts_recovery_and_report(store, wandb_offline, tmp_path, ray_session):
    output = tmp_path / "paired"
    config = tmp_path / "run.yaml"  # tracking from the run file; --track says the same on the command line
    config.write_text(
        "models: [tiny, {name: e-church, pretrained: tiny-erased, method: esdx, erased: [church]}]\n"
        "base_model: tiny\nconcepts: [church]\nnum_images: 2\ntracking: [mlflow, wandb]\n"
        f"probes: [{{name: standard_prompt, params: {{num_inference_steps: 2}}}}]\noutput: {output}\n")
    result = runner.invoke(app, ["run", str(config)])
    assert result.exit_code == 0, result.output
    [run] = _runs(store, "erasure-probe-engine")
    assert run.info.run_name == "paired" and "logged to MLflow" in result.output
    assert run.data.params["run.num_images"] == "2" and run.data.params["run.concepts"] == '["church"]'
    assert run.data.metrics["counts/rows_in_dataset"] == 4.0  # two prompts, the erased model and the base
    assert run.data.params["models"].count("e-church") == 1
    table = pd.read_csv(output / "report" / "recovery.csv")
    for _, line in table[table["value"].notna()].iterrows():  # every value of the recovery table is a metric
        key = metric_key("recovery", line["method"], line["probe_label"], line["metric_column"], "value")
        assert run.data.metrics[key] == pytest.approx(line["value"])
    assert {"none", "esdx"} <= set(table["method"])
    artifacts = {a.path for a in store.list_artifacts(run.info.run_id, "report")}
    assert {"report/report.html", "report/recovery.csv"} <= artifacts
    assert (output / "report" / "report.html").exists()  # the run keeps the report it logged
    [logged] = wandb_offline()  # W&B got the same record
    assert logged["name"] == "paired" and "logged to W&B" in result.output
    assert logged["config"]["run"]["num_images"] == 2 and logged["config"]["run"]["concepts"] == ["church"]
    assert {k: v for k, v in logged["summary"].items() if not k.startswith("_")} == run.data.metrics
    [artifact] = logged["artifacts"]
    assert {"report.html", "recovery.csv"} <= set(artifact["files"])


@pytest.mark.slow
def test_a_tune_search_logs_one_tracker_run_per_trial(store, wandb_offline, tmp_path, ray_session):
    result = runner.invoke(app, ["tune", "--probe", "noise_based", "--model", "tiny", "--concept", "church",
                                 "--num-samples", "2", "--num-images", "2", "--set", "params.num_inference_steps=2",
                                 "--set", "max_concurrent_trials=1", "--algorithm", "random",
                                 "--output", str(tmp_path / "tune"), "--track", "mlflow", "--track", "wandb"])
    assert result.exit_code == 0, result.output
    runs = _runs(store, "erasure-probe-engine-tune")
    assert len(runs) == 2
    for run in runs:
        assert run.data.tags["pair"] and any(k.startswith("eta") or "eta" in k for k in run.data.params)
        assert "objective" in run.data.metrics
    trials = wandb_offline()
    assert len(trials) == 2 and {t["project"] for t in trials} == {"erasure-probe-engine-tune"}
    for trial in trials:
        assert trial["group"] and trial["tags"] == ["pair:tiny x church"] and "objective" in trial["summary"]
        assert any("eta" in key for key in trial["config"])


def test_tracking_from_a_run_file_and_bad_trackers(tmp_path, monkeypatch):
    config = tmp_path / "run.yaml"
    config.write_text("models: [tiny]\nconcepts: [church]\nprobes: [standard_prompt]\nnum_images: 1\n"
                      f"output: {tmp_path / 'out'}\ntracking: [wandbb]\n")
    result = runner.invoke(app, ["run", str(config)])
    assert result.exit_code == 2 and "tracking" in result.output and "run.yaml:6" in result.output, result.output
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    result = runner.invoke(app, ["run", "--model", "tiny", "--concept", "church", "--probe", "standard_prompt",
                                 "--num-images", "1", "--output", str(tmp_path / "out"), "--track", "mlflow"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "needs the mlflow package" in lines[0], result.output
    assert not (tmp_path / "out").exists()


def test_names_and_params_fit_mlflow():
    assert metric_key("recovery", "esd-x", "noise_based[eta=1.5]", "judge_top1") == \
        "recovery/esd-x/noise_based_eta_1.5_/judge_top1"
    params = flat_params({"a": {"b": 1, "c": [1, 2]}, "d": "x" * 7000, "e": {}})
    assert params == {"a.b": "1", "a.c": "[1, 2]", "d": "x" * 6000, "e": "{}"}
