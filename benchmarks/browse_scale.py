"""`engine browse` on the synthetic paper-sized run of benchmarks/report_scale.py: start-up (reading
the score columns and the image index), then the first page, a cell page and its images, served
through Starlette's TestClient (the app without the network), each timed.

    PYTHONPATH=$PWD HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/report_scale.py --keep /tmp/grid \
        --report-args "--cells none"
    PYTHONPATH=$PWD HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/browse_scale.py /tmp/grid
"""

from __future__ import annotations

import re
import resource
import sys
import time

from starlette.testclient import TestClient

from engine.browse.app import create_app
from engine.browse.data import BrowseData


def timed(label: str, action):
    started = time.perf_counter()
    result = action()
    print(f"{label}: {time.perf_counter() - started:.2f} s")
    return result


def main(run_dir: str) -> None:
    data = timed("start-up (score columns, image index, cell rates)", lambda: BrowseData([run_dir]))
    client = TestClient(create_app(data))
    first = timed("first page (the grid, first probe)", lambda: client.get("/"))
    cell = re.findall(r'<a class="cell" href="([^"]+)"', first.text)[0].replace("&amp;", "&")
    page = timed("a cell page (24 images' captions)", lambda: client.get(cell))
    images = re.findall(r'src="(/image/[^"]+)"', page.text)
    timed(f"its {len(images)} images (probe and base)", lambda: [client.get(url) for url in images])
    timed("the same cell's next sort (lowest target probability first)", lambda: client.get(cell + "&sort=prob-asc"))
    print(f"{len(data.frame)} rows, {len(data.cells)} cells; peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main(sys.argv[1])
