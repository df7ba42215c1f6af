"""`engine report`: intervals against published values, a hand-made dataset whose every number is
computed by hand below, the files written, the self-contained HTML, merging runs, bad input."""

from __future__ import annotations

import base64
import io
import json
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from engine.cli import app
from engine.errors import UserError
from engine.metrics.stats import clopper_pearson_interval, mean_interval, wilson_interval
from engine.report.build import build_report
from engine.report.summary import summary_frame
from engine.report.tables import cell_stats, load_rows, pooled_stats
from engine.report.worst_case import ANY_CONTROL, ANY_PROBE
from engine.results import encode_png, rows_table

runner = CliRunner()
CLIP = "clip:ViT-B-32/openai"
JUDGE = "imagenet:resnet50/IMAGENET1K_V2"


# --------------------------------------------------------------------------- intervals


@pytest.mark.parametrize(
    "successes, n, low, high",
    [  # Newcombe (1998), Stat. Med. 17:857, Table I, method 3 (Wilson score, no continuity correction)
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0000, 0.1611),
        (1, 29, 0.0061, 0.1718),
    ],
)
def test_wilson_interval_matches_newcombe(successes, n, low, high):
    result = wilson_interval(successes, n)
    assert result == pytest.approx((low, high), abs=5e-5)


def test_wilson_edge_cases():
    assert wilson_interval(0, 0) == (None, None)
    assert wilson_interval(10, 10)[1] == 1.0 and wilson_interval(0, 10)[0] == 0.0
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


@pytest.mark.parametrize("df, quantile", [(1, 12.7062), (2, 4.3027), (5, 2.5706), (10, 2.2281), (29, 2.0452),
                                          (120, 1.9799)])  # fmt: skip
def test_mean_interval_half_width_is_the_tabulated_t_quantile(df, quantile):
    values = [0.0, 2.0] + [1.0] * (df - 1)  # n = df + 1, mean 1, sample sd sqrt(2 / df)
    mean, low, high = mean_interval(values)
    standard_error = (2.0 / df) ** 0.5 / (df + 1) ** 0.5
    assert mean == pytest.approx(1.0)
    assert (high - mean) / standard_error == pytest.approx(quantile, abs=5e-4)
    assert (mean - low) / standard_error == pytest.approx(quantile, abs=5e-4)


@pytest.mark.parametrize(
    "successes, n, low, high",
    [  # Clopper & Pearson (1934) exact limits, as tabulated (e.g. Newcombe 1998, Table I, method 5)
        (81, 263, 0.2527, 0.3676),
        (15, 148, 0.0578, 0.1617),
        (0, 20, 0.0000, 0.1684),
        (1, 29, 0.0009, 0.1776),
    ],
)
def test_clopper_pearson_interval_matches_tables(successes, n, low, high):
    assert clopper_pearson_interval(successes, n) == pytest.approx((low, high), abs=5e-4)


def test_mean_interval():
    assert mean_interval([]) == (None, None, None)
    assert mean_interval([3.0]) == (3.0, None, None)
    mean, low, high = mean_interval([20, 22, 24, 26])
    assert (mean, low, high) == pytest.approx((23.0, 18.891479, 27.108521), abs=1e-5)


# --------------------------------------------------------------------------- a hand-made run

# (model, method, concept, probe, params, clip, top1, top5, target prob, candidates)
# candidates = (count, clip mean, top-1 rate, top-5 rate) for the best-of-N probe.
CELLS = {
    "A": ("sd", "none", "church", "standard_prompt", "{}",
          [30, 32], [True, True], [True, True], [0.9, 0.7], None),
    "B": ("esdx", "esd-x", "church", "standard_prompt", "{}",
          [20, 22, 24, 26], [True, False, False, True], [True, True, False, True], [0.6, 0.2, 0.1, 0.5], None),
    "C": ("esdx", "esd-x", "van_gogh", "standard_prompt", "{}",
          [28, 30, 32], [None] * 3, [None] * 3, [None] * 3, None),
    "D": ("esdx", "esd-x", "church", "noise_based", '{"n":4}',
          [25, 27], [True, True], [True, True], [0.8, 0.6], [(2, 21.0, 0.5, 1.0), (6, 19.0, 1 / 3, 0.5)]),
}  # fmt: skip


def _records(cell: str, clip_model: str = CLIP) -> list[dict]:
    model, method, concept, probe, params, clips, top1, top5, probs, candidates = CELLS[cell]
    records = []
    for index, clip in enumerate(clips):
        image = np.full((16, 16, 3), (40 * index) % 256, np.uint8)
        record = {
            "row_id": f"{cell}{index}", "model": model, "method": method, "concept": concept,
            "target_concept": concept, "probe": probe, "params": params, "prompt": f"a picture of a {concept}",
            "prompt_index": index, "seed": 100 + index, "image": encode_png(image), "image_width": 16,
            "image_height": 16, "extras": "{}", "generation_seconds": 2.0, "device": "cpu", "engine_version": "t",
            "clip_score": float(clip), "clip_model": clip_model, "judge_top1": top1[index],
            "judge_top5": top5[index], "judge_target_prob": probs[index],
            "judge_model": JUDGE if top1[index] is not None else None,
        }  # fmt: skip
        if candidates:
            count, clip_mean, top1_rate, top5_rate = candidates[index]
            record.update(candidate_count=count, candidate_clip_mean=clip_mean, candidate_top1_rate=top1_rate,
                          candidate_top5_rate=top5_rate, selector=f"clip={CLIP}")  # fmt: skip
        records.append(record)
    return records


def _write_run(folder, records: list[dict], name: str = "part-0.parquet"):
    (folder / "rows").mkdir(parents=True, exist_ok=True)
    pq.write_table(rows_table(records), folder / "rows" / name)
    return folder


@pytest.fixture(scope="module")
def hand_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hand") / "run"
    return _write_run(folder, [r for cell in CELLS for r in _records(cell)])


def _cell(cells: pd.DataFrame, model: str, concept: str, probe: str) -> pd.Series:
    match = cells[(cells["model"] == model) & (cells["concept"] == concept) & (cells["probe"] == probe)]
    assert len(match) == 1
    return match.iloc[0]


# Every expected number, by hand. z = 1.959964, z^2 = 3.841459.
# Wilson(k, n): centre = (p + z^2/2n) / (1 + z^2/n), half = z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n).
#   2/2: centre 1.960365/2.920730 = 0.671196, half 0.328810    -> [0.342386, 1]
#   2/4: centre 0.5, half 0.686051/1.960365 = 0.349961          -> [0.150039, 0.849961]
#   3/4: centre 1.230182/1.960365 = 0.627528, half 0.326886     -> [0.300642, 0.954414]
# t interval: mean +- t(0.975, n-1) s / sqrt(n); t(1) = 12.706205, t(2) = 4.302653, t(3) = 3.182446.
#   A [30, 32]:         31 +- 12.706205 * 1.414214 / 1.414214 -> [18.293795, 43.706205]
#   B [20, 22, 24, 26]: 23 +- 3.182446 * 2.581989 / 2          -> [18.891479, 27.108521]
#   C [28, 30, 32]:     30 +- 4.302653 * 2 / 1.732051          -> [25.031725, 34.968275]
#   D [25, 27]:         26 +- 12.706205                         -> [13.293795, 38.706205]
# D's candidates (counts 2 and 6): top-1 (0.5*2 + 1/3*6)/8 = 0.375, top-5 (1*2 + 0.5*6)/8 = 0.625,
#   CLIP (21*2 + 19*6)/8 = 19.5.
EXPECTED = {
    ("sd", "church", "standard_prompt"): dict(
        n=2, clip_mean=31.0, clip_ci_low=18.293795, clip_ci_high=43.706205, top1_n=2, top1_hits=2,
        top1_rate=1.0, top1_ci_low=0.342386, top1_ci_high=1.0, top5_rate=1.0, top5_ci_low=0.342386,
        top5_ci_high=1.0, target_prob_mean=0.8),
    ("esdx", "church", "standard_prompt"): dict(
        n=4, clip_mean=23.0, clip_ci_low=18.891479, clip_ci_high=27.108521, top1_n=4, top1_hits=2,
        top1_rate=0.5, top1_ci_low=0.150039, top1_ci_high=0.849961, top5_hits=3, top5_rate=0.75,
        top5_ci_low=0.300642, top5_ci_high=0.954414, target_prob_mean=0.35),
    ("esdx", "van_gogh", "standard_prompt"): dict(
        n=3, clip_mean=30.0, clip_ci_low=25.031725, clip_ci_high=34.968275, top1_n=0, top1_hits=0),
    ("esdx", "church", "noise_based"): dict(
        n=2, clip_mean=26.0, clip_ci_low=13.293795, clip_ci_high=38.706205, top1_rate=1.0, top5_rate=1.0,
        candidate_n=8, candidate_top1_rate=0.375, candidate_top5_rate=0.625, candidate_clip_mean=19.5),
}  # fmt: skip


def test_cell_statistics_equal_the_hand_computed_values(hand_run):
    cells = cell_stats(load_rows([hand_run]))
    assert len(cells) == 4
    for (model, concept, probe), expected in EXPECTED.items():
        cell = _cell(cells, model, concept, probe)
        for column, value in expected.items():
            assert cell[column] == pytest.approx(value, abs=1e-5), (model, concept, probe, column)
    style = _cell(cells, "esdx", "van_gogh", "standard_prompt")
    assert all(pd.isna(style[c]) for c in ("top1_rate", "top1_ci_low", "top5_rate", "target_prob_mean"))
    assert _cell(cells, "esdx", "church", "noise_based")["selector"] == f"clip={CLIP}"
    assert pd.isna(_cell(cells, "esdx", "church", "standard_prompt")["candidate_n"])


def test_paper_table_averages_cells_over_concepts(hand_run):
    content = build_report([hand_run])
    paper = content.paper.set_index(["probe", "metric"])
    assert list(paper.columns) == ["none", "esd-x"]  # the base model first
    assert list(paper.index.get_level_values(0).unique()) == ["standard_prompt", "noise_based"]
    expected = {
        ("standard_prompt", "CLIP"): (31.0, (23.0 + 30.0) / 2),
        ("standard_prompt", "top-1 %"): (100.0, 50.0),  # the style cell has no top-1: it is left out
        ("standard_prompt", "top-5 %"): (100.0, 75.0),
        ("noise_based", "CLIP"): (None, 26.0),
        ("noise_based", "top-1 %"): (None, 100.0),
        ("noise_based", "CLIP, all candidates"): (None, 19.5),
        ("noise_based", "top-1 %, all candidates"): (None, 37.5),
        ("noise_based", "top-5 %, all candidates"): (None, 62.5),
    }
    for key, (base, erased) in expected.items():
        assert paper.loc[key, "esd-x"] == pytest.approx(erased)
        assert (pd.isna(paper.loc[key, "none"]) if base is None else paper.loc[key, "none"] == pytest.approx(base))
    assert ("standard_prompt", "top-1 %, all candidates") not in paper.index  # not a best-of-N probe


def test_pooled_plot_statistics(hand_run):
    pooled = pooled_stats(load_rows([hand_run])).set_index(["probe_label", "method"])
    row = pooled.loc[("standard_prompt", "esd-x")]
    assert row["n"] == 7 and row["clip_mean"] == pytest.approx(26.0)  # (20+22+24+26+28+30+32) / 7
    assert row["top1_rate"] == pytest.approx(0.5) and row["top1_n"] == 4


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def test_report_files_tables_and_self_contained_html(hand_run):
    content = build_report([hand_run])
    folder = hand_run / "report"
    assert content.output == folder
    for name in ["report.md", "report.html", "summary.parquet", "summary.csv", "paper_table.csv"]:
        assert (folder / name).stat().st_size > 0, name
    summary = pd.read_parquet(folder / "summary.parquet")
    assert len(summary) == 4 and len(pd.read_csv(folder / "summary.csv")) == 4
    cell = summary[(summary.model == "esdx") & (summary.concept == "church") & (summary.probe == "standard_prompt")]
    assert cell.iloc[0]["top1_ci_low"] == pytest.approx(0.150039, abs=1e-5)

    markdown = (folder / "report.md").read_text()
    assert "| esdx | esd-x | church | standard_prompt | 4 | 23.00 [18.89, 27.11] | 50.0 [15.0, 85.0] |" in markdown
    assert f"`{CLIP}`" in markdown and f"`{JUDGE}`" in markdown
    assert len(content.plots) == 3 and len(content.sheets) == 4
    for _, path in content.plots + content.sheets:
        assert f"]({path.relative_to(folder).as_posix()})" in markdown

    parser = _Collector()
    parser.feed((folder / "report.html").read_text(encoding="utf-8"))
    tags = [t for t, _ in parser.tags]
    assert tags.count("table") == 2 and tags.count("tr") == 1 + 9 + 1 + 4  # header + paper rows (3 + 6), header + cells
    images = [attrs for tag, attrs in parser.tags if tag == "img"]
    assert len(images) == 3 + 4
    for attrs in images:
        prefix = "data:image/png;base64,"
        assert attrs["src"].startswith(prefix)
        picture = Image.open(io.BytesIO(base64.b64decode(attrs["src"][len(prefix) :], validate=True)))
        picture.load()
        assert picture.width > 100 and picture.height > 100
    # Self-contained: nothing fetched from elsewhere.
    assert not [a for _, a in parser.tags for k in ("src", "href") if k in a and not a[k].startswith("data:")]
    assert "script" not in tags and "link" not in tags


def test_contact_sheet_shows_every_image_of_a_small_cell(hand_run):
    content = build_report([hand_run], hand_run / "sheets-test", max_images_per_cell=3)
    sheets = {(c["model"], c["concept"], c["probe"]): p for c, p in content.sheets}
    small = Image.open(sheets[("sd", "church", "standard_prompt")])  # 2 images in one row
    big = Image.open(sheets[("esdx", "church", "standard_prompt")])  # 4 images, capped at 3
    assert big.width > small.width and big.height == small.height


def test_terminal_summary_uses_the_same_numbers(hand_run):
    frame = summary_frame(hand_run)
    row = frame[(frame.model == "esdx") & (frame.concept == "church") & (frame.probe == "standard_prompt")].iloc[0]
    assert row["CLIP [95% CI]"] == "23.00 [18.89, 27.11]" and row["top-1 % [95% CI]"] == "50.0 [15.0, 85.0]"


def test_merged_runs_count_each_row_once(hand_run, tmp_path):
    extra = [*_records("A")[:1], {**_records("A")[1], "row_id": "A-new", "clip_score": 34.0}]
    second = _write_run(tmp_path / "second", extra)
    content = build_report([hand_run, second], tmp_path / "merged")
    cell = _cell(content.cells, "sd", "church", "standard_prompt")
    assert cell["n"] == 3 and cell["clip_mean"] == pytest.approx((30 + 32 + 34) / 3)
    assert json.loads(json.dumps(content.runs)) == [str(hand_run), str(second)]
    with pytest.raises(UserError, match="several run folders are merged into one report: give --output DIR"):
        build_report([hand_run, second])


def test_rows_from_different_judges_are_refused(tmp_path):
    run = _write_run(tmp_path / "mixed", _records("A") + _records("B", clip_model="clip:ViT-L-14/openai"))
    with pytest.raises(UserError, match="scored by different judges"):
        build_report([run])


@pytest.mark.parametrize("args, expected", [
    (["report", "{tmp}/missing"], "run folder not found"),
    (["report", "{tmp}"], "holds no result rows"),
    (["report", "{hand}", "{hand}"], "give --output DIR"),
])  # fmt: skip
def test_report_bad_input_exits_2_with_one_line(hand_run, tmp_path, args, expected):
    args = [a.format(tmp=tmp_path, hand=hand_run) for a in args]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.output


def test_unscored_run_still_reports_counts_and_images(tmp_path):
    unscored = [{k: v for k, v in r.items() if k not in ("clip_score", "clip_model", "judge_top1", "judge_top5",
                                                         "judge_target_prob", "judge_model")} for r in _records("B")]
    content = build_report([_write_run(tmp_path / "unscored", unscored)])
    assert content.plots == [] and len(content.sheets) == 1 and content.judges == []
    assert content.cells.iloc[0]["n"] == 4 and pd.isna(content.cells.iloc[0]["clip_mean"])
    assert "Judges: none (unscored rows)" in (content.output / "report.md").read_text()


# --------------------------------------------------------------------------- recovery vs preservation


def _paired_records() -> list[dict]:
    """Base model `sd` and two erased models: esdx_church (erased church) and uce_church (erased
    church), probed on church (recovery) and on airliner (preservation), plus noise sweep variants
    whose labels must sort numerically (eta=2 < eta=10)."""
    records = []

    def add(model, method, concept, target, probe, params, role, top1, clip, seed_base=100):
        for index, (hit, _) in enumerate(zip(top1, clip, strict=True)):
            image = np.full((16, 16, 3), (30 * index) % 256, np.uint8)
            records.append({
                "row_id": f"{model}-{concept}-{target}-{probe}-{params}-{index}", "model": model, "method": method,
                "concept": concept, "target_concept": target, "probe": probe, "params": params,
                "prompt": f"a picture of a {target}", "prompt_index": index, "seed": seed_base + index,
                "image": encode_png(image), "image_width": 16, "image_height": 16, "extras": "{}",
                "generation_seconds": 1.0, "device": "cpu", "engine_version": "t", "judge_top1": hit,
                "judge_top5": hit, "judge_target_prob": 0.5, "judge_model": JUDGE, "clip_score": None,
                "role": role,
            })  # fmt: skip

    add("sd", "none", "church", "church", "standard_prompt", "{}", "base", [True] * 4, [None] * 4)
    add("sd", "none", "airliner", "airliner", "standard_prompt", "{}", "base", [True, True, True, False], [None] * 4)
    add("esdx_church", "esdx", "church", "church", "standard_prompt", "{}", "recovery", [False] * 3 + [True],
        [None] * 4)
    add("uce_church", "uce", "church", "church", "standard_prompt", "{}", "recovery", [False] * 4, [None] * 4)
    add("esdx_church", "esdx", "church", "church", "noise_based", '{"eta":10}', "recovery", [True] * 2, [None] * 2)
    add("esdx_church", "esdx", "church", "church", "noise_based", '{"eta":2}', "recovery", [False] * 2, [None] * 2)
    add("esdx_church", "esdx", "airliner", "airliner", "standard_prompt", "{}", "preservation",
        [True, False, True, False], [None] * 4)
    return records


def _write_paired_run(folder):
    records = _paired_records()
    table = rows_table(records)  # `role` is a schema column (engine.results.PAIRING_FIELDS)
    (folder / "rows").mkdir(parents=True, exist_ok=True)
    pq.write_table(table, folder / "rows" / "part-0.parquet")
    return folder


def test_recovery_table_pools_erased_concepts_and_matches_the_rows(tmp_path):
    content = build_report([_write_paired_run(tmp_path / "paired")])
    recovery = pd.read_csv(tmp_path / "paired" / "report" / "recovery.csv")
    frame = load_rows([tmp_path / "paired"])
    # Recompute every recovery cell from the rows: recovery rows of the method, or the base's rows
    # on the erased concepts, pooled.
    worst_case = recovery["probe_label"].isin([ANY_PROBE, ANY_CONTROL])
    assert recovery.loc[worst_case, "probe_label"].tolist() == [ANY_PROBE] * 3  # base, esdx, uce; no control ran
    assert worst_case.iloc[-3:].all()  # the last lines (tests/report/test_worst_case.py checks their numbers)
    for _, line in recovery[~worst_case].iterrows():
        if line["method"] == "none":
            rows = frame[(frame.role == "base") & (frame.concept == "church") & (frame.probe_label == line.probe_label)]
        else:
            rows = frame[(frame.role == "recovery") & (frame.method == line.method)
                         & (frame.probe_label == line.probe_label)]
        values = rows[line.metric_column].dropna().astype(float)  # rates: True = 1
        assert line["n"] == len(values) and line["value"] == pytest.approx(values.mean())
    assert set(recovery.metric_column) == {"judge_top1", "judge_top5", "judge_target_prob"}  # no CLIP judge ran
    standard = recovery[(recovery.probe_label == "standard_prompt") & (recovery.metric_column == "judge_top1")]
    assert dict(zip(standard.method, standard.value, strict=False)) == {"none": 1.0, "esdx": 0.25, "uce": 0.0}
    assert list(dict.fromkeys(recovery.probe_label)) == [
        "standard_prompt", "noise_based[eta=2]", "noise_based[eta=10]", ANY_PROBE]  # numeric order, worst case last
    assert list(content.paper.columns[:5]) == ["probe", "metric", "none", "none low", "none high"]


def test_preservation_table_compares_with_the_base_on_the_same_prompts(tmp_path):
    build_report([_write_paired_run(tmp_path / "paired")])
    preservation = pd.read_csv(tmp_path / "paired" / "report" / "preservation.csv")
    top1 = preservation[preservation.metric_column == "judge_top1"].iloc[0]
    assert top1["method"] == "esdx" and top1["n"] == 4 and top1["value"] == pytest.approx(0.5)
    assert top1["base_n"] == 4 and top1["base_value"] == pytest.approx(0.75)
    assert top1["ratio_to_base"] == pytest.approx(0.5 / 0.75)


def test_paired_report_sections_and_sheets(tmp_path):
    content = build_report([_write_paired_run(tmp_path / "paired")])
    markdown = (content.output / "report.md").read_text()
    recovery_at = markdown.index("## Recovery: does the erased concept come back?")
    preservation_at = markdown.index("## Preservation: what did erasure break?")
    assert recovery_at < preservation_at
    line = "| standard_prompt | top-1 % | 100.0 [51.0, 100.0] (4) | 25.0 [4.6, 69.9] (4) | 0.0 [0.0, 49.0] (4) |"
    assert line in markdown  # each cell: value [95% CI] (n)
    assert "CLIP" not in markdown[recovery_at:preservation_at]  # no CLIP judge: no CLIP rows
    assert "Probes x methods (mean over concepts)" not in markdown  # nothing unpaired to mix
    titles = [title for title, _ in content.paired_sheets]
    assert titles == [f"church / {p}: the same prompt and seed across methods"
                      for p in ("standard_prompt", "noise_based[eta=2]", "noise_based[eta=10]")]
    sheet = Image.open(content.paired_sheets[0][1])
    assert sheet.height > 4 * 128  # one line per seed


def test_terminal_summary_of_a_paired_run_is_the_recovery_table(tmp_path):
    from engine.report.summary import paper_summary

    text = paper_summary(_write_paired_run(tmp_path / "paired"))
    lines = text.splitlines()
    assert lines[0].startswith("Recovery") and "base model" in lines[1] and "esdx" in lines[1]
    standard = next(line for line in lines if line.split()[:3] == ["standard_prompt", "top-1", "%"])
    assert "100.0 [51.0, 100.0]" in standard and "25.0 [4.6, 69.9]" in standard
    assert any(line.startswith("Preservation") for line in lines)
    assert paper_summary(_write_run(tmp_path / "plain", _records("A"))) is None  # nothing erased declared


def test_a_clip_column_chosen_by_a_clip_selector_is_marked_inflated(hand_run, tmp_path):
    content = build_report([hand_run], tmp_path / "inflated")
    markdown = (content.output / "report.md").read_text()
    noise_line = next(line for line in markdown.splitlines() if "| noise_based |" in line and "| esdx |" in line)
    assert "26.00 [13.29, 38.71] *" in noise_line  # CLIP picked the candidate and CLIP judges it
    assert "100.0 [34.2, 100.0] *" not in noise_line  # the ImageNet judge did not pick: an honest sample
    assert "19.50" in noise_line  # the all-candidates CLIP mean beside it
    assert "selection-inflated" in markdown
    standard_line = next(line for line in markdown.splitlines() if "| standard_prompt |" in line and "| esdx |" in line)
    assert "*" not in standard_line
