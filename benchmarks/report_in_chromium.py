"""How long headless Chromium takes to open a report.html (Debian's chromium and chromium-driver,
selenium): time to the load event, the first paint, how many images and links the page has and
whether every image scrolled into view loads.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/report_in_chromium.py REPORT_DIR/report.html
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service


def main(report: Path) -> None:
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        started = time.perf_counter()
        driver.get(report.resolve().as_uri())  # returns after the load event
        loaded = time.perf_counter() - started
        paint = driver.execute_script(
            "const p = performance.getEntriesByName('first-contentful-paint')[0]; return p ? p.startTime : null;")
        images = driver.execute_script("return document.images.length;")
        links = driver.execute_script("return document.links.length;")
        ok = 0
        for index in range(images):
            driver.execute_script("document.images[arguments[0]].scrollIntoView();", index)
            for _ in range(100):
                if driver.execute_script("return document.images[arguments[0]].complete;", index):
                    break
                time.sleep(0.05)
            ok += driver.execute_script("return document.images[arguments[0]].naturalWidth > 0;", index)
        size = report.stat().st_size / 1e6
        painted = paint / 1000 if paint is not None else float("nan")
        print(f"{report} ({size:.2f} MB): load event after {loaded:.2f} s, first contentful paint at "
              f"{painted:.2f} s; {images} images ({ok} loaded), {links} links")
    finally:
        driver.quit()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
