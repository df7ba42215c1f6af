"""`engine browse` through Starlette's TestClient on a small paired run: the grid overview with its
probe tabs and rates, a cell's paged images sorted by target probability and filtered by hit / miss
beside the base model's image of the same prompt and seed, the PNGs themselves, nothing written,
and the command's defaults and bad input."""

from __future__ import annotations

import io
import re

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from engine.cli import app
from engine.results import encode_png, rows_table

pytest.importorskip("starlette")
from starlette.testclient import TestClient

from engine.browse.app import create_app
from engine.browse.data import PAGE, BrowseData

runner = CliRunner()
SEEDS = 30  # more than a page


def _rows(model, method, role, probe, hits, shade):
    records = []
    for index in range(SEEDS):
        records.append({
            "row_id": f"{model}-{probe}-{index:02d}", "model": model, "method": method, "concept": "church",
            "target_concept": "church", "probe": probe, "params": "{}", "prompt": f"a church {index % 3}",
            "prompt_index": index, "seed": 100 + index, "role": role,
            "image": encode_png(np.full((8, 8, 3), (shade + index) % 256, np.uint8)), "image_width": 8,
            "image_height": 8, "extras": "{}", "generation_seconds": 1.0, "device": "cpu", "engine_version": "t",
            "judge_top1": hits(index), "judge_top5": True, "judge_target_prob": index / SEEDS, "judge_model": "toy:v1",
        })  # fmt: skip
    return records


@pytest.fixture(scope="module")
def paired_run(tmp_path_factory):
    return _write_paired_run(tmp_path_factory.mktemp("browse") / "run")


def _write_paired_run(folder):
    """The base model and one erased model on church, 30 seeds; the erased one under two probes."""
    (folder / "rows").mkdir(parents=True)
    pq.write_table(rows_table(_rows("sd", "none", "base", "standard_prompt", lambda i: True, 0)),
                   folder / "rows" / "base.parquet")
    pq.write_table(rows_table(_rows("esdx_church", "esdx", "recovery", "standard_prompt", lambda i: i % 3 == 0, 100)
                              + _rows("esdx_church", "esdx", "recovery", "noise_based", lambda i: i % 2 == 0, 200)),
                   folder / "rows" / "erased.parquet")
    return folder


@pytest.fixture(scope="module")
def client(paired_run):
    return TestClient(create_app(BrowseData([paired_run])))


def _links(html, css_class):
    return [m.replace("&amp;", "&") for m in re.findall(rf'<a class="{css_class}" href="([^"]+)"', html)]


def test_overview_shows_the_grid_per_probe_with_rates(client):
    page = client.get("/")
    assert page.status_code == 200
    tabs = re.findall(r'<nav>(.*?)</nav>', page.text, re.S)[0]
    assert "standard_prompt" in tabs and "noise_based" in tabs
    assert "<th>base model</th><th>esdx</th>" in page.text.replace("\n", "")
    assert "33 [19, 51] (30)" in page.text  # esdx: 10 of 30 hits, Wilson interval
    assert "100 [89, 100] (30)" in page.text  # the base model
    noise = client.get("/?probe=noise_based")
    assert "50 [33, 67] (30)" in noise.text and len(_links(noise.text, "cell")) == 1  # the base ran no noise probe
    assert client.get("/?probe=nope").status_code == 404


def test_a_cell_pages_images_by_target_probability_beside_the_base(client):
    [link] = [u for u in _links(client.get("/").text, "cell") if "esdx" in u]
    page = client.get(link)
    assert page.status_code == 200
    probe_images = re.findall(r'class="probe-image" alt="[^"]*" src="/image/([^"]+)"', page.text)
    base_images = re.findall(r'class="base-image" alt="[^"]*" src="/image/([^"]+)"', page.text)
    expected = [f"esdx_church-standard_prompt-{i:02d}" for i in range(SEEDS - 1, SEEDS - 1 - PAGE, -1)]
    assert probe_images == expected  # highest target probability first, one page
    assert base_images == [e.replace("esdx_church", "sd") for e in expected]  # same prompt and seed
    second = client.get(re.search(r'id="next" href="([^"]+)"', page.text).group(1).replace("&amp;", "&"))
    assert len(re.findall('class="probe-image"', second.text)) == SEEDS - PAGE
    misses = client.get(link + "&hit=miss&sort=seed")
    ids = re.findall(r'class="probe-image" alt="[^"]*" src="/image/[^"]+-(\d+)"', misses.text)
    assert [int(i) for i in ids] == [i for i in range(SEEDS) if i % 3][:PAGE]
    assert "miss" in misses.text and 'class="hit"' not in misses.text
    assert client.get("/cell?method=esdx&concept=tench&probe=standard_prompt").status_code == 404


def test_images_are_the_rows_pngs(client):
    response = client.get("/image/esdx_church-noise_based-07")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    pixels = np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"))
    assert pixels.shape == (8, 8, 3) and (pixels == 207).all()
    assert client.get("/image/nope").status_code == 404


def test_browsing_writes_nothing(paired_run, client):
    before = sorted((p, p.stat().st_mtime_ns) for p in paired_run.rglob("*"))
    for url in ["/", "/?probe=noise_based", "/cell?method=esdx&concept=church&probe=standard_prompt",
                "/image/sd-standard_prompt-00"]:
        assert client.get(url).status_code == 200
    assert sorted((p, p.stat().st_mtime_ns) for p in paired_run.rglob("*")) == before


def test_the_command_binds_localhost_by_default(paired_run, monkeypatch):
    import uvicorn

    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app_, host, port, log_level: served.update(host=host, port=port))
    result = runner.invoke(app, ["browse", str(paired_run)])
    assert result.exit_code == 0, result.output
    assert served == {"host": "127.0.0.1", "port": 8765} and "90 rows in 3 cells" in result.output


def test_a_missing_run_folder_is_one_line(tmp_path):
    result = runner.invoke(app, ["browse", str(tmp_path / "missing")])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "run folder not found" in lines[0], result.output


@pytest.fixture(scope="module")
def preservation_client(tmp_path_factory):
    """A paired run with preservation rows (interference on tench, the base model on tench beside it)
    and a recovery probe run with two params sets."""
    folder = tmp_path_factory.mktemp("browse-roles") / "run"
    (folder / "rows").mkdir(parents=True)
    erased = _rows("esdx_church", "esdx", "recovery", "noise_based", lambda i: i % 2 == 0, 0)
    for row in erased:
        row["params"] = '{"eta":1.0}' if row["seed"] % 2 else '{"eta":2.0}'
    kept = _rows("esdx_church", "esdx", "preservation", "interference", lambda i: i < 27, 50)
    base = _rows("sd", "none", "base", "interference", lambda i: True, 90)
    for row in [*kept, *base]:
        row.update(concept="tench", target_concept="tench", row_id=row["row_id"] + "-tench")
    pq.write_table(rows_table(erased + kept + base), folder / "rows" / "all.parquet")
    return TestClient(create_app(BrowseData([folder])))


def test_rows_of_another_role_are_browsed_with_the_base_beside_them(preservation_client):
    page = preservation_client.get("/")
    roles = re.search(r'<nav id="roles">(.*?)</nav>', page.text, re.S).group(1)
    assert "recovery" in roles and "preservation" in roles
    assert "tench" not in page.text  # the default view: erased models on what they erased
    kept = preservation_client.get("/?role=preservation&probe=interference")
    assert kept.status_code == 200 and "<th>tench</th>" in kept.text
    assert "90 [74, 97] (30)" in kept.text and "100 [89, 100] (30)" in kept.text  # esdx 27/30, the base 30/30
    [link] = [u for u in _links(kept.text, "cell") if "esdx" in u]
    assert "role=preservation" in link and preservation_client.get(link).status_code == 200
    assert preservation_client.get("/?role=nope").status_code == 404


def test_each_params_set_of_a_probe_is_its_own_tab_and_cell(preservation_client):
    page = preservation_client.get("/")
    tabs = re.findall(r"<nav>(.*?)</nav>", page.text, re.S)[0]
    assert "noise_based[eta=1.0]" in tabs and "noise_based[eta=2.0]" in tabs
    link = "/cell?method=esdx&concept=church&probe=noise_based[eta=1.0]&sort=seed"
    odd = preservation_client.get(link)
    seeds = [int(s) for s in re.findall(r'class="probe-image" alt="seed (\d+)"', odd.text)]
    assert seeds == [s for s in range(100, 100 + SEEDS) if s % 2] and "15 shown" in odd.text
