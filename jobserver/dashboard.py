"""The web page at ``/``: one HTML file, a stylesheet and a script, shipped as package data.

No build step, no CDN, no external fonts: the page works on a box without internet.  It
reads the same JSON API as every client (with the token kept in the browser's session
storage, sent as ``Authorization: Bearer``), so it can show nothing the API does not.
The Content-Security-Policy pins every script, style and request to this server.
"""

from __future__ import annotations

from importlib import resources

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

PACKAGE = "jobserver"
STATIC_DIR = "static"
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _page() -> bytes:
    return resources.files(PACKAGE).joinpath(STATIC_DIR, "index.html").read_bytes()


async def page(request: Request) -> Response:
    return Response(_page(), media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)


def routes() -> list[BaseRoute]:
    return [
        Route("/", page, methods=["GET"]),
        Mount("/static", StaticFiles(packages=[(PACKAGE, STATIC_DIR)]), name="static"),
    ]
