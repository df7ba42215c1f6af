"""`--track wandb`: offline by default, a finished run's record becomes one W&B run (config,
summary metrics, the report as an artifact) read back from W&B's own offline log; a W&B mode it
does not know is one error line before any work; tune trials get Ray's W&B callback, offline."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from engine.cli import app
from engine.tracking.run_record import RunRecord
from engine.tracking.wandb_run import log_run

runner = CliRunner()


def _record(tmp_path) -> RunRecord:
    report = tmp_path / "report"
    (report / "sheets").mkdir(parents=True)
    (report / "report.html").write_text("<html></html>")
    (report / "recovery.csv").write_text("method,value\nesdx,0.25\n")
    (report / "sheets" / "cell.png").write_bytes(b"\x89PNG")
    return RunRecord(name="paired",
                     config={"num_images": 2, "concepts": ["church"], "probes": [{"name": "noise_based"}]},
                     tags={"engine_version": "0.1", "status": "complete", "git_commit": "abc", "output": "x"},
                     metrics={"counts/rows_in_dataset": 4.0, "recovery/esdx/noise_based/judge_top1/value": 0.25},
                     report_dir=report)


def test_a_finished_run_is_one_offline_wandb_run_by_default(wandb_offline, tmp_path, monkeypatch, capfd):
    monkeypatch.delenv("WANDB_MODE")  # nothing said: the engine's default, offline
    line = log_run(_record(tmp_path))
    printed = capfd.readouterr()
    assert "wandb:" not in printed.out + printed.err  # the engine's line is the only one
    [run] = wandb_offline()
    assert run["name"] == "paired" and run["project"] == "erasure-probe-engine" and run["job_type"] == "engine-run"
    assert run["config"]["num_images"] == 2 and run["config"]["probes"] == [{"name": "noise_based"}]
    assert run["config"]["engine_run"]["status"] == "complete"
    assert run["summary"]["counts/rows_in_dataset"] == 4.0
    assert run["summary"]["recovery/esdx/noise_based/judge_top1/value"] == 0.25
    [artifact] = run["artifacts"]
    assert artifact["type"] == "report" and artifact["name"] == "report-paired"
    assert artifact["files"] == ["recovery.csv", "report.html", "sheets/cell.png"]
    assert "offline" in line and f"wandb sync {tmp_path}/wandb/offline-run-" in line


def test_an_unknown_wandb_mode_is_one_line_before_any_work(wandb_offline, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offlin")
    result = runner.invoke(app, ["run", "--model", "tiny", "--concept", "church", "--probe", "standard_prompt",
                                 "--num-images", "1", "--output", str(tmp_path / "out"), "--track", "wandb"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "WANDB_MODE=offlin" in lines[0], result.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "wandb").exists()


def test_tune_trials_get_rays_wandb_callback_offline_in_the_drivers_folder(wandb_offline, tmp_path, monkeypatch):
    pytest.importorskip("ray.air.integrations.wandb")
    from ray.air.integrations.wandb import WandbLoggerCallback

    from engine.tracking.wandb_run import wandb_target
    from engine.tune.search import SearchSettings, _callbacks

    monkeypatch.delenv("WANDB_DIR")
    monkeypatch.chdir(tmp_path)
    target = wandb_target(project_suffix="-tune")
    settings = SearchSettings(algorithm="random", num_samples=2, seed=0, startup_trials=2, grid_points=2,
                              scheduler=None, max_t=2, resources={"cpu": 1}, max_concurrent=1,
                              storage_path=str(tmp_path / "tune"), experiment="tiny_church_x", reuse_actors=False,
                              torch_threads=None, wandb=target)
    [callback] = _callbacks(settings, None, "tiny/church")
    assert isinstance(callback, WandbLoggerCallback)
    assert callback.project == "erasure-probe-engine-tune" and callback.group == "tiny_church_x"
    # The trials' logging actors run in their trial folders: the W&B folder is the driver's, absolute.
    assert callback.kwargs["mode"] == "offline" and callback.kwargs["dir"] == str(tmp_path)
    callback.setup()  # offline needs no API key
