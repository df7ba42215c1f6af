"""`engine report` at grid scale, on a small synthetic run: the image column is read one sheet's row
groups at a time (never the whole dataset's), sheets past the embedding limit are files that
report.html links, `--cells` chooses the sheets, and bad `--cells` input is one error line."""

from __future__ import annotations

import itertools
from html.parser import HTMLParser

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from engine.cli import app
from engine.report.build import SheetOptions, build_report
from engine.report.cell_filter import parse_cell_filters
from engine.results import encode_png, rows_table

runner = CliRunner()
MODELS = [("sd", "none"), ("esdx_a", "esd-x"), ("uce_a", "uce")]
CONCEPTS = ["church", "tench"]
PROBES = ["standard_prompt", "noise_based"]
ROWS_PER_CELL = 5


def _write_grid(folder):
    """One results file per (model, probe), as a run writes a work unit's rows; 12 cells of 5 rows."""
    (folder / "rows").mkdir(parents=True)
    for file_number, ((model, method), probe) in enumerate(itertools.product(MODELS, PROBES)):
        records = []
        for concept, index in itertools.product(CONCEPTS, range(ROWS_PER_CELL)):
            image = np.full((8, 8, 3), (file_number * 20 + index) % 256, np.uint8)
            records.append({
                "row_id": f"{model}-{probe}-{concept}-{index}", "model": model, "method": method, "concept": concept,
                "target_concept": concept, "probe": probe, "params": "{}", "prompt": f"a picture of a {concept}",
                "prompt_index": index, "seed": index, "image": encode_png(image), "image_width": 8, "image_height": 8,
                "extras": "{}", "generation_seconds": 1.0, "device": "cpu", "engine_version": "t",
                "judge_top1": index % 2 == 0, "judge_top5": True, "judge_target_prob": 0.1 * index,
                "judge_model": "toy:v1", "role": "unpaired",
            })  # fmt: skip
        pq.write_table(rows_table(records), folder / "rows" / f"part-{file_number}.parquet")
    return folder


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory):
    return _write_grid(tmp_path_factory.mktemp("scale") / "run")


class _ImageReads:
    """Counts the rows of every Parquet read that asks for the image column."""

    def __init__(self, monkeypatch):
        self.rows = 0
        self.whole_reads = 0
        original_group, original_table = pq.ParquetFile.read_row_group, pq.read_table

        def read_row_group(parquet, index, columns=None, **kwargs):
            table = original_group(parquet, index, columns=columns, **kwargs)
            if columns is None or "image" in columns:
                self.rows += table.num_rows
            return table

        def read_table(source, *args, columns=None, **kwargs):
            table = original_table(source, *args, columns=columns, **kwargs)
            if columns is None or "image" in columns:
                self.whole_reads += 1
                self.rows += table.num_rows
            return table

        monkeypatch.setattr(pq.ParquetFile, "read_row_group", read_row_group)
        monkeypatch.setattr(pq, "read_table", read_table)


def test_the_image_column_is_read_only_for_the_sheets_row_groups(grid_run, tmp_path, monkeypatch):
    reads = _ImageReads(monkeypatch)
    wanted = parse_cell_filters(["model=uce_a,concept=church,probe=standard_prompt"])
    content = build_report([grid_run], tmp_path / "one", sheets=SheetOptions(max_images=2, cells=wanted))
    assert "image" not in content.frame.columns and content.rows == 60
    assert [(c["model"], c["concept"], c["probe"]) for c, _ in content.sheets] == [("uce_a", "church",
                                                                                      "standard_prompt")]
    # Only the one file (row group) that holds that cell's rows was read with its images: 10 of 60 rows.
    assert reads.whole_reads == 0 and reads.rows == 2 * ROWS_PER_CELL


def test_every_sheet_reads_each_row_group_once(grid_run, tmp_path, monkeypatch):
    reads = _ImageReads(monkeypatch)
    content = build_report([grid_run], tmp_path / "all", max_images_per_cell=3)
    assert len(content.sheets) == 12
    assert reads.whole_reads == 0 and reads.rows == 60  # six files of ten rows, each read once (cached)


def test_sheets_past_the_limit_are_files_that_the_html_links(grid_run, tmp_path):
    content = build_report([grid_run], tmp_path / "linked", sheets=SheetOptions(max_images=3, embed_limit=0))
    assert not content.embed_sheets
    html = (tmp_path / "linked" / "report.html").read_text(encoding="utf-8")
    parser = _Collector()
    parser.feed(html)
    links = [attrs["href"] for tag, attrs in parser.tags if tag == "a"]
    assert sorted(links) == sorted(path.relative_to(tmp_path / "linked").as_posix() for _, path in content.sheets)
    assert all((tmp_path / "linked" / link).is_file() for link in links)
    images = [attrs["src"] for tag, attrs in parser.tags if tag == "img"]
    assert images and all(src.startswith("data:image/png;base64,") for src in images)  # the plots stay embedded
    assert html.index("<table>") < html.index("Images per cell")  # summary tables first
    markdown = (tmp_path / "linked" / "report.md").read_text(encoding="utf-8")
    assert all(f"]({link})" in markdown for link in links)


def test_small_reports_stay_self_contained(grid_run, tmp_path):
    content = build_report([grid_run], tmp_path / "small", max_images_per_cell=2)
    assert content.embed_sheets
    parser = _Collector()
    parser.feed((tmp_path / "small" / "report.html").read_text(encoding="utf-8"))
    assert not [a for _, a in parser.tags for k in ("src", "href") if k in a and not a[k].startswith("data:")]


def test_cells_flag_chooses_the_sheets(grid_run, tmp_path):
    result = runner.invoke(app, ["report", str(grid_run), "--output", str(tmp_path / "r"),
                                 "--cells", "method=esd-x,probe=noise*", "--cells", "model=sd,concept=tench"])
    assert result.exit_code == 0, result.output
    sheets = sorted(p.name.split("__")[0] + "/" + p.name.split("__")[1] for p in (tmp_path / "r" / "sheets").glob("*"))
    assert sheets == ["esdx_a/church", "esdx_a/tench", "sd/tench", "sd/tench"]
    result = runner.invoke(app, ["report", str(grid_run), "--output", str(tmp_path / "n"), "--cells", "none"])
    assert result.exit_code == 0 and not list((tmp_path / "n" / "sheets").glob("*"))


@pytest.mark.parametrize("value, expected", [
    ("concpt=church", "unknown key 'concpt' (did you mean 'concept'?)"),
    ("church", "write KEY=PATTERN"),
])  # fmt: skip
def test_bad_cells_filter_is_one_line_before_any_work(grid_run, tmp_path, value, expected):
    result = runner.invoke(app, ["report", str(grid_run), "--output", str(tmp_path / "bad"), "--cells", value])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --cells") and expected in lines[0], result.output
    assert not (tmp_path / "bad").exists()


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
