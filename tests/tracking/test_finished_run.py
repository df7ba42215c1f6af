"""Logging a finished run to its trackers (engine.tracking.finished_run): each tracker's line in
turn, and a tracker that fails is one line naming it and where to look."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import pytest

from engine.errors import UserError
from engine.tracking import finished_run
from engine.tracking.trackers import TRACKERS, TrackerKind


@dataclass(frozen=True)
class _Fake(TrackerKind):
    """A tracker whose logging returns a line, or raises `error`."""

    error: Exception | None = None

    def log_run(self):
        def log(record):
            if self.error is not None:
                raise self.error
            return f"logged {record}"

        return log


@pytest.fixture
def fake_record(monkeypatch):
    @contextmanager
    def record(output, config):
        yield "the record"

    monkeypatch.setattr(finished_run, "run_record", record)


def test_each_tracker_logs_in_turn_and_a_failure_names_the_tracker_and_its_hint(fake_record, monkeypatch):
    monkeypatch.setitem(TRACKERS, "mlflow", _Fake("mlflow", "MLflow", "check MLFLOW_TRACKING_URI", ""))
    refused = ConnectionError("the server said no\nsecond line")
    monkeypatch.setitem(TRACKERS, "wandb", _Fake("wandb", "W&B", "check WANDB_MODE", "", error=refused))
    lines = finished_run.log_finished_run("out", {}, ["mlflow", "wandb"])
    assert next(lines) == "logged the record"
    with pytest.raises(UserError) as failure:
        next(lines)
    assert str(failure.value) == ("the run is complete, but logging it to W&B failed "
                                  "(ConnectionError: the server said no); check WANDB_MODE")


def test_every_tracker_names_a_module_that_logs_a_run():
    for kind in TRACKERS.values():
        assert callable(kind.log_run())
