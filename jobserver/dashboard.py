"""The web page at ``/``: one HTML file, a stylesheet and a script, shipped as package data.

No build step, no CDN, no external fonts: the page works on a box without internet.  It
reads the same JSON API as every client (with the token kept in the browser's session
storage, sent as ``Authorization: Bearer``), so it can show nothing the API does not.
The Content-Security-Policy pins every script, style and request to this server.

The first paint shows data: the page's endpoint (``api.page``) reads what the script
would fetch and ``render_page`` embeds it as a JSON block that the script draws from
before its first request.  A server that needs a token gets no snapshot (a browser's
page request carries none) and says so instead of "connecting".
"""

from __future__ import annotations

import functools
from importlib import resources

from starlette.routing import BaseRoute, Mount
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
# Where the snapshot goes in index.html: a data block (never executed, so the CSP's
# script-src does not apply to it), and the connection pill's first words.
SNAPSHOT_BLOCK = b'<script id="snapshot" type="application/json">null</script>'
CONNECTING = (
    b'<span id="connection" class="pill" data-state="connecting">connecting\xe2\x80\xa6</span>'
)
NEEDS_TOKEN = b'<span id="connection" class="pill" data-state="error">token needed</span>'
LIVE = b'<span id="connection" class="pill" data-state="live">live</span>'


@functools.cache
def _page() -> bytes:
    page = resources.files(PACKAGE).joinpath(STATIC_DIR, "index.html").read_bytes()
    if page.count(SNAPSHOT_BLOCK) != 1 or page.count(CONNECTING) != 1:
        raise RuntimeError("index.html lacks the snapshot block or the connection pill")
    return page


def render_page(snapshot: bytes | None) -> bytes:
    """index.html with ``snapshot`` (JSON) embedded; None: the caller needs a token."""
    page = _page()
    if snapshot is None:
        return page.replace(CONNECTING, NEEDS_TOKEN)
    # Inside <script>, "</script>" or "<!--" in a string would end or change the block:
    # JSON may write "<" as \u003c, and then the text holds neither.
    block = SNAPSHOT_BLOCK.replace(b"null", snapshot.replace(b"<", b"\\u003c"))
    return page.replace(SNAPSHOT_BLOCK, block).replace(CONNECTING, LIVE)


def routes() -> list[BaseRoute]:
    return [Mount("/static", StaticFiles(packages=[(PACKAGE, STATIC_DIR)]), name="static")]
