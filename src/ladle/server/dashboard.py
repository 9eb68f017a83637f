"""GET /dashboard: one static page and its scripts, served from the package (server/static/),
with the chart library vendored beside them (no CDN). The page is public; the data it shows comes
from the JSON APIs a script would call (GET /admin/models, /admin/stats, /v1/usage), with the
admin key the user types into it."""

from __future__ import annotations

import functools
from importlib import resources

from starlette.requests import Request
from starlette.responses import Response

from ladle.server.errors import APIError

PAGE = "dashboard.html"
ASSETS = {  # what /dashboard/{name} serves: its file under static/, its media type
    "dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "uPlot.iife.min.js": ("vendor/uPlot.iife.min.js", "text/javascript; charset=utf-8"),
    "uPlot.min.css": ("vendor/uPlot.min.css", "text/css; charset=utf-8"),
}
HEADERS = {
    "Cache-Control": "no-cache",
    # scripts and data from this server only; uPlot sets element styles from its script
    "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}


@functools.cache
def _read(path: str) -> bytes:
    return (resources.files("ladle.server") / "static" / path).read_bytes()


async def page(request: Request) -> Response:
    return Response(_read(PAGE), media_type="text/html; charset=utf-8", headers=HEADERS)


async def asset(request: Request) -> Response:
    name = request.path_params["name"]
    if name not in ASSETS:
        raise APIError(404, f"no dashboard file {name!r}", code="not_found")
    path, media_type = ASSETS[name]
    return Response(_read(path), media_type=media_type, headers=HEADERS)
