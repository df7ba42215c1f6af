"""The recovery table's worst case over probes ("any probe") and its null over the controls, on
synthetic rows whose answer is known by hand."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from scipy import stats

from engine.metrics.stats import wilson_interval
from engine.probe import worst_case_probe_names
from engine.report.paper import recovery_table
from engine.report.sections import recovery_section
from engine.report.tables import probe_labels
from engine.report.worst_case import ANY_CONTROL, ANY_PROBE, with_worst_case, worst_case_table
from engine.results import ROW_SCHEMA

ATTACK = '{"mode":"attack"}'
RANDOM = '{"mode":"random"}'


def rows_of(model, method, concept, probe, params, hits, role="recovery", selector=None):
    return [{"model": model, "method": method, "concept": concept, "target_concept": concept, "probe": probe,
             "params": params, "prompt": f"a {concept}", "seed": seed, "judge_top1": hit, "role": role,
             "selector": selector, "judge_model": "toy:judge", "clip_model": None, "probe_label": probe}
            for seed, hit in enumerate(hits)]


def one_concept_frame() -> pd.DataFrame:
    rows = [
        *rows_of("m1", "esd-x", "c1", "standard_prompt", "{}", [False, False, True, False]),
        *rows_of("m1", "esd-x", "c1", "adversarial_prompt", ATTACK, [False, True, True, False],
                 selector="judge=toy:judge"),
        # two noise candidates of one request are one request: seed 3's second candidate hits
        *rows_of("m1", "esd-x", "c1", "noise_based", '{"eta":1.0}', [False, False, False, False]),
        *rows_of("m1", "esd-x", "c1", "noise_based", '{"eta":2.0}', [False, False, False, None]),
        # diffusion completion recovers everything, but its images are partly the base model's
        *rows_of("m1", "esd-x", "c1", "diffusion_completion", "{}", [True, True, True, True]),
        *rows_of("m1", "esd-x", "c1", "adversarial_prompt", RANDOM, [True, False, False, False],
                 selector="judge=toy:judge"),
        *rows_of("base", "none", "c1", "standard_prompt", "{}", [True, True, True, False], role="base"),
    ]
    frame = pd.DataFrame(rows)
    frame["probe_label"] = probe_labels(frame)
    return frame


def line(table, label, method):
    found = table[(table["probe_label"] == label) & (table["method"] == method)]
    assert len(found) == 1, (label, method, table)
    return found.iloc[0]


def test_default_set_leaves_out_completion_controls_and_preservation():
    names = worst_case_probe_names(["standard_prompt", "diffusion_completion", "interference", "adversarial_prompt",
                                    "noise_based", "inpainting", "textual_inversion"])
    assert names == {"standard_prompt", "adversarial_prompt", "noise_based", "inpainting", "textual_inversion"}


def test_one_concept_any_probe_is_a_wilson_rate_over_requests():
    table = worst_case_table(one_concept_frame())
    erased = line(table, ANY_PROBE, "esd-x")
    # seeds 1 and 2 are recovered by the attack or the standard prompt; completion is not counted
    assert (erased["n"], erased["value"]) == (4, 0.5)
    assert (erased["ci_low"], erased["ci_high"]) == pytest.approx(wilson_interval(2, 4))
    assert erased["inflated"]  # the attack's rows kept their image on the judge's word
    control = line(table, ANY_CONTROL, "esd-x")
    assert (control["n"], control["value"]) == (4, 0.25)
    assert (control["ci_low"], control["ci_high"]) == pytest.approx(wilson_interval(1, 4))
    base = line(table, ANY_PROBE, "none")
    assert (base["n"], base["value"], bool(base["inflated"])) == (4, 0.75, False)
    assert len(table[table["method"] == "none"]) == 1  # no control ran on the base model


def test_the_probe_set_is_a_setting():
    table = worst_case_table(one_concept_frame(), probes=["diffusion_completion"])
    assert line(table, ANY_PROBE, "esd-x")["value"] == 1.0
    table = worst_case_table(one_concept_frame(), probes=["noise_based"])
    assert line(table, ANY_PROBE, "esd-x")["value"] == 0.0


def test_several_concepts_pool_per_concept_rates_with_a_t_interval():
    # per-concept rates 2/4, 3/4, 2/4 -> mean 7/12, Student t over the 3 concepts (df 2)
    hits = {"c1": [True, True, False, False], "c2": [True, True, True, False], "c3": [False, True, False, True]}
    frame = pd.DataFrame([r for concept, h in hits.items()
                          for r in rows_of(f"m-{concept}", "uce", concept, "standard_prompt", "{}", h)])
    erased = line(worst_case_table(frame), ANY_PROBE, "uce")
    rates = [0.5, 0.75, 0.5]
    mean = sum(rates) / 3
    half = stats.t.ppf(0.975, 2) * math.sqrt(sum((r - mean) ** 2 for r in rates) / 2) / math.sqrt(3)
    assert (erased["n"], erased["value"]) == (12, pytest.approx(7 / 12))
    assert (erased["ci_low"], erased["ci_high"]) == pytest.approx((mean - half, mean + half))
    # two concepts: the mean, no interval
    two = frame[frame["concept"] != "c3"]
    erased = line(worst_case_table(two), ANY_PROBE, "uce")
    assert erased["value"] == pytest.approx(0.625) and erased["ci_low"] is None and erased["ci_high"] is None


def test_worst_case_lines_come_last_in_the_recovery_table():
    frame = one_concept_frame()
    for column in ROW_SCHEMA.names:  # the columns a run's rows have, empty where the test sets none
        if column not in frame:
            frame[column] = None
    recovery = with_worst_case(recovery_table(frame), frame)
    assert list(recovery["probe_label"].iloc[-3:]) == [ANY_PROBE, ANY_PROBE, ANY_CONTROL]
    section = recovery_section(recovery, "Recovery", ["probe_label", "metric"])
    labels = [row[0] for row in section.table.rows]
    assert labels[-2:] == [ANY_PROBE, ANY_CONTROL]
    assert section.table.rows[-2][1:] != section.table.rows[-1][1:]
    assert "any probe" in section.note


def test_conditional_rate_counts_prompts_the_base_draws_and_the_standard_prompt_misses():
    from engine.report.conditional import conditional_table

    frame = one_concept_frame()
    # base standard prompt: seeds 0, 1, 2 drawn; erased standard prompt: seed 2 recovered -> seeds 0, 1
    # need an attack
    table = conditional_table(frame)
    attack = table[(table["method"] == "esd-x") & (table["probe"] == "adversarial_prompt[mode=attack]")].iloc[0]
    assert (attack["n"], attack["value"]) == (4, 0.5)  # seeds 1, 2
    assert (attack["conditional_n"], attack["conditional_value"]) == (2, 0.5)  # seed 1 of seeds 0, 1
    standard = table[(table["method"] == "esd-x") & (table["probe"] == "standard_prompt")].iloc[0]
    assert (standard["conditional_n"], standard["conditional_value"]) == (2, 0.0)
    worst = table[(table["method"] == "esd-x") & (table["probe"] == ANY_PROBE)].iloc[0]
    assert (worst["value"], worst["conditional_value"]) == (0.5, 0.5)
    assert "none" not in set(table["method"])


def test_engine_report_takes_the_worst_case_probes(tmp_path):
    import numpy as np
    import pyarrow.parquet as pq
    from typer.testing import CliRunner

    from engine.cli import app
    from engine.results import encode_png, rows_table

    frame = one_concept_frame().drop(columns=["probe_label", "clip_model"])
    png = encode_png(np.full((16, 16, 3), 60, np.uint8))
    records = [{**r, "row_id": f"r{i}", "prompt_index": r["seed"], "image": png, "image_width": 16,
                "image_height": 16, "extras": "{}", "generation_seconds": 1.0, "device": "cpu", "engine_version": "t",
                "judge_top5": r["judge_top1"], "judge_target_prob": 0.5, "clip_score": None,
                "selector": r["selector"] if isinstance(r["selector"], str) else None}
               for i, r in enumerate(frame.to_dict("records"))]
    (tmp_path / "run" / "rows").mkdir(parents=True)
    pq.write_table(rows_table(records), tmp_path / "run" / "rows" / "part-0.parquet")
    result = CliRunner().invoke(app, ["report", str(tmp_path / "run"), "--worst-case-probe", "diffusion_completion"])
    assert result.exit_code == 0, result.output
    recovery = pd.read_csv(tmp_path / "run" / "report" / "recovery.csv")
    assert line(recovery, ANY_PROBE, "esd-x")["value"] == 1.0  # completion alone, as asked
    bad = CliRunner().invoke(app, ["report", str(tmp_path / "run"), "--worst-case-probe", "no_such_probe"])
    assert bad.exit_code == 2 and "no_such_probe" in bad.output
