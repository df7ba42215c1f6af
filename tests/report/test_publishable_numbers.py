"""Numbers a researcher can publish, on synthetic rows whose right answers are known by hand:
best-of-N read three ways with its control, intervals over concepts, base rows counted once, the
ratio's interval, and failed rows counted in their cells."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from scipy import stats

from engine.failures import RowFailure, write_failures
from engine.metrics.stats import concept_pooled_interval, ratio_interval
from engine.probe import WorkRow
from engine.report.build import build_report
from engine.report.paper import preservation_table, recovery_table
from engine.report.tables import cell_stats, load_failures, load_rows, probe_labels
from engine.results import encode_png, rows_table

JUDGE = "imagenet:tiny/random-seed0"
CLIP = "clip=clip:tiny-clip/random-seed0"


def _row(model, method, concept, probe, index, hit, *, target=None, params="{}", role="recovery", **extra):
    return {
        "row_id": f"{model}-{concept}-{target}-{probe}-{params}-{index}", "model": model, "method": method,
        "concept": concept, "target_concept": target or concept, "probe": probe, "params": params,
        "prompt": f"a picture of a {target or concept}", "prompt_index": index, "seed": 100 + index,
        "generation_seconds": 1.0, "judge_top1": hit, "judge_top5": hit, "judge_target_prob": 0.5,
        "judge_model": JUDGE, "clip_score": None, "clip_model": None, "selector": None, "candidate_count": None,
        "candidate_clip_mean": None, "candidate_top1_rate": None, "candidate_top5_rate": None,
        "candidate_hits": None, "role": role, **extra,
    }  # fmt: skip


def _frame(records: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame.from_records(records)
    frame["probe_label"] = probe_labels(frame)
    return frame


def _best_of_three(model, method, concept, params, kept, candidate_hits, role="recovery"):
    return [
        _row(model, method, concept, "noise_based", i, k, params=params, role=role, selector=CLIP, candidate_count=3,
             candidate_top1_rate=float(np.mean(h)), candidate_top5_rate=float(np.mean(h)), candidate_hits=h)
        for i, (k, h) in enumerate(zip(kept, candidate_hits, strict=True))
    ]  # fmt: skip


def _line(table: pd.DataFrame, probe_label: str, metric: str, method: str) -> pd.Series:
    found = table[(table.probe_label == probe_label) & (table.metric == metric) & (table.method == method)]
    assert len(found) == 1, table[["probe_label", "metric", "method"]]
    return found.iloc[0]


def test_best_of_n_is_read_three_ways_beside_its_control_with_the_selector_named():
    hits = [[True, False, False], [False, False, False], [False, True, True], [False, False, False]]
    control_hits = [[False, False, False], [True, False, False], [False, False, False], [False, False, False]]
    frame = _frame(
        _best_of_three("esd_a", "esd", "a", '{"control":"off"}', [False, False, True, False], hits)
        + _best_of_three("esd_a", "esd", "a", '{"control":"only"}', [False, True, False, False], control_hits)
    )
    table = recovery_table(frame)
    probe, control = "noise_based (best of 3 by CLIP)", "noise_based control (best of 3 by CLIP)"
    assert set(table.probe_label) == {probe, control}
    # Kept: 1 of 4 prompts; all candidates: mean of 1/3, 0, 2/3, 0; any candidate: 2 of 4 prompts.
    assert _line(table, probe, "top-1 %", "esd")["value"] == pytest.approx(0.25)
    assert _line(table, probe, "top-1 %, all candidates", "esd")["value"] == pytest.approx(0.25)
    assert _line(table, probe, "top-1 %, any candidate (upper bound)", "esd")["value"] == pytest.approx(0.5)
    assert _line(table, control, "top-1 %", "esd")["value"] == pytest.approx(0.25)
    assert _line(table, control, "top-1 %, all candidates", "esd")["value"] == pytest.approx(1 / 12)
    assert _line(table, control, "top-1 %, any candidate (upper bound)", "esd")["value"] == pytest.approx(0.25)
    # One concept: intervals over prompts (Wilson for the per-prompt hits, t for per-prompt shares).
    any_line = _line(table, probe, "top-1 %, any candidate (upper bound)", "esd")
    low, high = stats.binomtest(2, 4).proportion_ci(method="wilson")
    assert (any_line["ci_low"], any_line["ci_high"]) == pytest.approx((low, high))
    assert any_line["n_label"] == "4"
    # The readings of one probe stand together, the kept one first, and the control follows it.
    order = list(zip(table.probe_label, table.metric, strict=True))
    assert order.index((probe, "top-1 %")) + 1 == order.index((probe, "top-1 %, all candidates"))
    assert order.index((probe, "top-1 %, any candidate (upper bound)")) < order.index((control, "top-1 %"))


def test_a_pooled_cell_is_the_mean_of_per_concept_rates_with_a_t_interval_over_concepts():
    records = []
    for concept, hits in {"a": [False] * 4, "b": [True, False, True, False], "c": [True] * 4}.items():
        records += [_row(f"esd_{concept}", "esd", concept, "standard_prompt", i, h) for i, h in enumerate(hits)]
    line = _line(recovery_table(_frame(records)), "standard_prompt", "top-1 %", "esd")
    # 0 %, 50 %, 100 %: mean 50 %, t interval over 3 concepts (df 2) clipped to [0, 1], never Wilson on 12 images.
    half = stats.t.ppf(0.975, 2) * 0.5 / np.sqrt(3)
    assert line["value"] == pytest.approx(0.5) and line["n_label"] == "3 concepts x 4"
    assert (line["ci_low"], line["ci_high"]) == pytest.approx((max(0, 0.5 - half), min(1, 0.5 + half)))
    wilson = stats.binomtest(6, 12).proportion_ci(method="wilson")
    assert line["ci_high"] - line["ci_low"] > wilson.high - wilson.low


def test_two_concepts_give_no_interval_and_say_why():
    records = [_row("esd_a", "esd", "a", "standard_prompt", i, False) for i in range(8)]
    records += [_row("esd_b", "esd", "b", "standard_prompt", i, True) for i in range(8)]
    line = _line(recovery_table(_frame(records)), "standard_prompt", "top-1 %", "esd")
    assert line["value"] == pytest.approx(0.5) and pd.isna(line["ci_low"]) and pd.isna(line["ci_high"])
    assert line["ci_note"].startswith("n/a: 2 concepts")


def test_concept_pooled_interval_matches_student_t_over_concepts():
    values = [0.25, 0.5, 0.5, 0.75, 0.5]
    mean, low, high, note = concept_pooled_interval(values, (0.0, 1.0))
    half = stats.t.ppf(0.975, 4) * np.std(values, ddof=1) / np.sqrt(5)
    assert note is None and mean == pytest.approx(0.5) and (low, high) == pytest.approx((0.5 - half, 0.5 + half))


def test_the_base_column_is_restricted_to_the_concepts_of_a_method_that_lacks_some():
    records = [_row("sd", "none", c, "standard_prompt", i, c == "a", role="base") for c in "abc" for i in range(4)]
    records += [_row(f"esd_{c}", "esd", c, "standard_prompt", i, False) for c in "abc" for i in range(4)]
    records += [_row("uce_a", "uce", "a", "standard_prompt", i, False) for i in range(4)]
    table = recovery_table(_frame(records))
    assert _line(table, "standard_prompt", "top-1 %", "none")["value"] == pytest.approx(1 / 3)  # a, b, c
    assert _line(table, "standard_prompt", "top-1 %", "none on a")["value"] == pytest.approx(1.0)  # uce's concepts


def test_base_rows_are_counted_once_however_many_erased_models_draw_their_target():
    records = []
    for model, erased in (("esd_a", "a"), ("esd_b", "b")):  # both draw target x on the same prompts and seeds
        records += [_row(model, "esd", erased, "interference", i, i < 2, target="x", role="preservation")
                    for i in range(4)]
    records += [_row("sd", "none", "x", "interference", i, i < 3, target="x", role="base") for i in range(4)]
    line = preservation_table(_frame(records)).query("metric_column == 'judge_top1'").iloc[0]
    assert line["base_n"] == 4  # the distinct base rows, not 4 per erased model
    assert line["base_value"] == pytest.approx(0.75) and line["value"] == pytest.approx(0.5)
    assert line["ratio_to_base"] == pytest.approx(0.5 / 0.75)


def test_the_ratio_interval_covers_the_true_ratio_in_at_least_90_percent_of_200_draws():
    covered = 0
    for draw in range(200):
        rng = np.random.default_rng(draw)
        base_rates = rng.uniform(0.4, 0.95, 12)  # 12 target concepts, 30 prompts each
        base = rng.binomial(30, base_rates) / 30
        erased = rng.binomial(30, 0.7 * base_rates) / 30  # the truth: erased / base = 0.7
        _, low, high = ratio_interval(erased.tolist(), base.tolist())
        covered += low <= 0.7 <= high
    assert covered >= 180


def test_the_ratio_is_blank_when_the_base_rate_is_zero_and_has_no_interval_below_three_units():
    assert ratio_interval([0.5, 0.2, 0.1], [0.0, 0.0, 0.0]) == (None, None, None)
    ratio, low, high = ratio_interval([0.5, 0.3], [1.0, 1.0])
    assert ratio == pytest.approx(0.4) and low is None and high is None


def _failure(model, method, concept, probe, index, role="recovery") -> RowFailure:
    row = WorkRow(f"{model}-{concept}-{concept}-{probe}-{{}}-{index}", model, method, concept, concept, probe, "{}",
                  f"a picture of a {concept}", index, 100 + index, role, (concept,))
    return RowFailure.of(row, "BadImage", "all-black image")


def test_failed_rows_are_counted_in_their_cell_and_left_out_of_the_rate(tmp_path):
    records = [_row("esd_a", "esd", "a", "standard_prompt", i, i == 0) for i in range(2)]
    records += [_row("uce_a", "uce", "a", "standard_prompt", i, True) for i in range(2)]
    for record in records:
        record.update(image=encode_png(np.zeros((8, 8, 3), np.uint8)), image_width=8, image_height=8, extras="{}",
                      device="cpu", engine_version="t", erased=["a"])
    (tmp_path / "run" / "rows").mkdir(parents=True)
    pq.write_table(rows_table(records), tmp_path / "run" / "rows" / "part-0.parquet")
    failures = [_failure("esd_a", "esd", "a", "standard_prompt", i) for i in (2, 3)]
    failures += [_failure("div_a", "diverges", "a", "standard_prompt", i) for i in range(4)]  # every row failed
    failures += [_failure("div_a", "diverges", "a", "inpainting", i) for i in range(2)]  # a probe with no row at all
    write_failures(tmp_path / "run", failures)

    frame = load_rows([tmp_path / "run"])
    failed = load_failures([tmp_path / "run"], frame)
    table = recovery_table(frame, failures=failed)
    esd = _line(table, "standard_prompt", "top-1 %", "esd")
    assert esd["failed"] == 2 and esd["n"] == 2 and esd["value"] == pytest.approx(0.5)  # over generated rows
    assert _line(table, "standard_prompt", "top-1 %", "uce")["failed"] == 0
    diverges = _line(table, "standard_prompt", "top-1 %", "diverges")
    assert diverges["failed"] == 4 and diverges["n"] == 0 and pd.isna(diverges["value"])
    assert _line(table, "inpainting", "top-1 %", "diverges")["failed"] == 2
    cells = cell_stats(frame, failed).set_index("model")
    assert cells.loc["esd_a", "failed"] == 2
    assert sorted(cells.loc["div_a", "failed"]) == [2, 4] and set(cells.loc["div_a", "n"]) == {0}

    content = build_report([tmp_path / "run"])
    markdown = (content.output / "report.md").read_text()
    assert "Failed rows (failures.parquet, left out of every rate): 8" in markdown
    assert "(failed 2)" in markdown and "(failed 4)" in markdown
    paper = pd.read_csv(content.output / "paper_table.csv")
    assert paper.loc[(paper.probe == "standard_prompt") & (paper.metric == "top-1 %"), "esd failed"].item() == 2
    assert json.loads(json.dumps(list(paper.columns)))[:2] == ["probe", "metric"]


def test_what_erased_models_draw_instead_names_the_top1_classes_beside_the_base_models():
    from engine.report.draws_instead import draws_instead_table

    toy = "toy:toy-judge-v1/file:judge.safetensors@x"
    records = [_row("esd_c", "esd", "toy_circle", "standard_prompt", i, False, judge_top5_classes=[top, 0, 1, 2, 3])
               for i, top in enumerate([1, 1, 7, 0])]  # square, square, diamond, circle (render.CONCEPTS)
    records += [_row("sd", "none", "toy_circle", "standard_prompt", i, True, role="base",
                     judge_top5_classes=[0, 1, 2, 3, 4]) for i in range(4)]
    records += [_row("esd_c", "esd", "toy_circle", "inpainting", i, False, judge_top5_classes=[5, 0, 1, 2, 3])
                for i in range(4)]  # not the baseline probe: left out
    frame = _frame(records).assign(judge_model=toy)
    table = draws_instead_table(frame)
    assert table.to_dict("records") == [{
        "method": "esd", "concept": "toy_circle", "n": 4, "erased models draw": "square 50%, diamond 25%, circle 25%",
        "base n": 4, "base model draws": "circle 100%"}]
