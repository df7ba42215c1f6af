"""What `engine tune` prints per pair, including a pair none of whose trials completed."""

from __future__ import annotations

from engine.storage import output_location
from engine.tune.execute import PairOutcome, TuneSummary, summary_lines


def _pair(best, trials: int = 3) -> PairOutcome:
    return PairOutcome(model="toy-esdx-circle", concept="toy_circle", trials=trials, best=best,
                       best_config=None if best is None else "out/best.yaml", pipeline_loads=1,
                       worker_processes=1, first_trial_seconds=2.0, later_trial_seconds=0.5)


def test_a_pair_without_a_completed_trial_gets_one_line_not_a_crash(tmp_path):
    best = {"ci_low": 0.1, "ci_high": 0.9, "objective_name": "judge_top1", "objective": 0.5, "n": 4,
            "searched": "{'eta': 1.0}", "heldout_n": None}
    summary = TuneSummary(output_location(str(tmp_path)), str(tmp_path / "trials.parquet"),
                          [_pair(None), _pair(best)], 1.0)
    lines = summary_lines(summary)
    assert lines[0] == "toy-esdx-circle x toy_circle: no trial completed of 3; no best setting"
    assert lines[1].startswith("toy-esdx-circle x toy_circle: best judge_top1 in-sample 0.5")
    assert "-> out/best.yaml" in lines[1]
    assert lines[-1].startswith("trials: ")
