"""A real browser on `engine browse` and report.html: headless Chromium (Debian's chromium and
chromium-driver; .ci/run installs them) goes overview -> cell -> image and checks that every image
on each page loaded, on a synthetic paired run (exact counts) and on the demo's toy-world run; then
opens a report whose sheets are linked files and checks the same."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from engine.report.build import SheetOptions, build_report

pytestmark = pytest.mark.slow
webdriver = pytest.importorskip("selenium.webdriver")
CHROMEDRIVER = shutil.which("chromedriver")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if not (CHROMEDRIVER and CHROMIUM):
    pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
                allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@contextmanager
def _serving(run: Path) -> Iterator[str]:
    """`engine browse RUN` in a subprocess on a free port; yields its URL once it answers."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-m", "engine.cli", "browse", str(run), "--port", str(port)],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):  # the engine's imports on a busy machine
            try:
                urllib.request.urlopen(url + "/", timeout=1)
                break
            except OSError:
                if process.poll() is not None:
                    pytest.fail(process.stdout.read().decode() if process.stdout else "engine browse exited")
                time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from test_browse import _write_paired_run  # this folder is on sys.path (pytest prepends it)

    run = _write_paired_run(tmp_path_factory.mktemp("browser") / "run")
    with _serving(run) as url:
        yield run, url


@pytest.fixture(scope="module")
def toy_world_server(demo_run):
    """The demo's run (tests/conftest.py): the toy world's ESD-x model and the base model under four
    probes, judged."""
    run, _ = demo_run
    with _serving(run) as url:
        yield url


def _images_loaded(driver) -> list[bool]:
    """Each image of the page, scrolled into view (report.html loads sheet files lazily), loaded?"""
    script = "return Array.from(document.images).map(i => i.complete && i.naturalWidth > 0);"
    for index in range(len(driver.execute_script(script))):
        driver.execute_script("document.images[arguments[0]].scrollIntoView();", index)
        for _ in range(100):
            if driver.execute_script("return document.images[arguments[0]].complete;", index):
                break
            time.sleep(0.1)
    return driver.execute_script(script)


def test_overview_cell_and_image_load_in_chromium(server, browser):
    _, url = server
    browser.get(url + "/")
    assert browser.find_element("id", "grid")
    links = browser.find_elements("css selector", "a.cell")
    assert len(links) == 2
    links[-1].click()  # the erased model's cell
    tiles = browser.find_elements("css selector", "img.probe-image")
    assert len(tiles) == 24 and len(browser.find_elements("css selector", "img.base-image")) == 24
    loaded = _images_loaded(browser)
    assert loaded and all(loaded)
    browser.find_element("css selector", "img.probe-image").find_element("xpath", "..").click()
    assert browser.current_url.startswith(url + "/image/")
    assert all(_images_loaded(browser))  # the PNG on its own


def test_a_toy_world_run_browses_in_chromium(toy_world_server, browser):
    browser.get(toy_world_server + "/")
    assert browser.find_element("id", "grid")
    erased = [link.get_attribute("href") for link in browser.find_elements("css selector", "a.cell")
              if "method=esd" in (link.get_attribute("href") or "")]
    assert erased, browser.page_source[:2000]
    browser.get(erased[0])
    assert browser.find_elements("css selector", "img.probe-image")
    assert browser.find_elements("css selector", "img.base-image")  # the base model's image beside each
    loaded = _images_loaded(browser)
    assert loaded and all(loaded)
    browser.find_element("css selector", "img.probe-image").find_element("xpath", "..").click()
    assert browser.current_url.startswith(toy_world_server + "/image/") and all(_images_loaded(browser))


def test_a_grid_report_opens_with_its_linked_sheets(server, browser, tmp_path):
    run, _ = server
    content = build_report([run], tmp_path / "report", sheets=SheetOptions(max_images=4, embed_limit=0))
    browser.get((tmp_path / "report" / "report.html").as_uri())
    assert browser.find_elements("css selector", "table")
    assert all(_images_loaded(browser))  # plots (embedded) and paired sheets (files)
    links = browser.find_elements("css selector", "ul.links a")
    assert len(links) == len(content.sheets)
    links[0].click()
    assert browser.current_url.endswith(".png") and all(_images_loaded(browser))
