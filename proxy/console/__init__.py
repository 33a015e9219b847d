"""The game-day console: a static page served by the admin listener at `/`
(index.html) and `/console/<file>`, reading the same JSON API the CLI uses
(served by the same proxy, so every route it asks for is there).

The files hold no data, so they are served without the token even where
reads need it (off loopback): the page asks for the token itself when the
API answers 401.  A strict Content-Security-Policy keeps any script but the
console's own file from running, so a query name shown on the page (client
input) cannot become code.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

HERE = Path(__file__).resolve().parent
FILES = {
    "index.html": "text/html",
    "console.js": "text/javascript",
    "console.css": "text/css",
    "favicon.svg": "image/svg+xml",
}
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def is_console_path(path: str) -> bool:
    return path == "/" or path.startswith("/console/")


def _file(name: str) -> web.Response:
    if name not in FILES:
        raise web.HTTPNotFound(text="no such console file")
    return web.Response(body=(HERE / name).read_bytes(), content_type=FILES[name],
                        charset="utf-8" if FILES[name].startswith("text/") else None,
                        headers=HEADERS)


async def index(request: web.Request) -> web.Response:
    return _file("index.html")


async def console_file(request: web.Request) -> web.Response:
    return _file(request.match_info["file"])


def add_console_routes(app: web.Application) -> None:
    app.router.add_get("/", index)
    app.router.add_get("/console/{file}", console_file)
