"""`engine browse`: a small read-only web app over one or more run folders.

/                 the grid: methods x concepts for one probe (tabs), each cell's top-1 rate with its
                  95% Wilson interval, coloured by the rate, linking to its page
/cell             one cell's images, PAGE a page, sorted by the judge's target probability (or seed),
                  filtered by hit / miss; each with prompt, seed, params, top-1 class and target
                  probability, the base model's image of the same prompt and seed beside it. A probe run
                  with several params sets has a tab (and cells) per set: `noise_based[eta=1.5]`
?role=            on both: which rows (recovery, preservation or unpaired; the base model's rows on
                  the same concepts come with each); default recovery where the runs have it
/image/{row_id}   one PNG, read from the row group that holds it

Pages are plain HTML (jinja2, autoescaped), no script; every request only reads.
"""

from __future__ import annotations

import json
from urllib.parse import urlencode

from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response
from starlette.routing import Route

from engine.browse.data import HITS, PAGE, SORTS, BrowseData
from engine.metrics.columns import TOP5_CLASSES
from engine.report.draws_instead import class_namer, top1_of
from engine.report.tables import method_label


def _environment() -> Environment:
    environment = Environment(loader=PackageLoader("engine.browse", "templates"), autoescape=select_autoescape())
    environment.filters["pct"] = lambda v: "–" if v is None else f"{100 * v:.0f}"
    environment.globals["method_label"] = method_label
    return environment


def create_app(data: BrowseData) -> Starlette:
    templates = _environment()
    name = class_namer(data.frame)

    def page(template: str, **context) -> HTMLResponse:
        return HTMLResponse(templates.get_template(template).render(runs=data.runs, **context))

    def role_of(request: Request) -> str | None:
        """The `role` query parameter; ValueError for one the runs do not have."""
        role = request.query_params.get("role") or None
        if role is not None and role not in data.roles():
            raise ValueError(f"no rows of role {role!r} (have: {', '.join(data.roles())})")
        return role

    async def overview(request: Request) -> Response:
        try:
            role = role_of(request)
        except ValueError as error:
            return PlainTextResponse(str(error), status_code=404)
        probes = data.probes(role)
        probe = request.query_params.get("probe") or (probes[0] if probes else "")
        if probe not in probes:
            return PlainTextResponse(f"unknown probe {probe!r}", status_code=404)
        chosen = role or data.default_role
        return page("overview.html.j2", probes=probes, probe=probe, methods=data.methods(role),
                    concepts=data.concepts(role), cells=data.cells_of(role), roles=data.roles(), role=chosen,
                    link=lambda **q: "/cell?" + urlencode({**q, "role": chosen} if chosen else q))

    async def cell(request: Request) -> Response:
        query = request.query_params
        try:
            role = role_of(request)
        except ValueError as error:
            return PlainTextResponse(str(error), status_code=404)
        key = (query.get("method", ""), query.get("concept", ""), query.get("probe", ""))
        cells = data.cells_of(role)
        if key not in cells:
            return PlainTextResponse("no such cell", status_code=404)
        sort = query.get("sort", SORTS[0]) if query.get("sort") in SORTS else SORTS[0]
        hit = query.get("hit", "all") if query.get("hit") in HITS else "all"
        rows = data.rows(*key, sort, hit, role)
        pages = max(1, -(-len(rows) // PAGE))
        number = min(max(0, int(query.get("page", "0")) if query.get("page", "0").isdigit() else 0), pages - 1)
        shown = []
        for row in rows.iloc[number * PAGE:(number + 1) * PAGE].to_dict("records"):
            top1 = top1_of(row.get(TOP5_CLASSES))
            shown.append({**row, "params_text": json.dumps(json.loads(row["params"]), sort_keys=True),
                          "top1_name": None if top1 is None else name(top1, row.get("target_concept")),
                          "base_id": data.base_row_id(row)})
        method, concept, probe = key

        def link(**changes) -> str:
            current = {"method": method, "concept": concept, "probe": probe, "sort": sort, "hit": hit,
                       "page": number, "role": role or ""}
            return "/cell?" + urlencode({k: v for k, v in {**current, **changes}.items() if v != ""})

        return page("cell.html.j2", cell=cells[key], rows=shown, page=number, pages=pages, total=len(rows),
                    sort=sort, hit=hit, sorts=SORTS, hits=HITS, link=link)

    async def image(request: Request) -> Response:
        png = data.image(request.path_params["row_id"])
        if png is None:
            return PlainTextResponse("no such image", status_code=404)
        return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    return Starlette(routes=[Route("/", overview), Route("/cell", cell), Route("/image/{row_id}", image)])
