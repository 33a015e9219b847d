"""The admin HTTP listener: health, metrics and the game-day API (proxy/api.py),
served by aiohttp in the proxy's own event loop."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest


def make_app(server: Any) -> web.Application:
    from proxy.api import auth_middleware

    settings = server.settings
    # Off loopback, anyone on the network could read the runs, rules and
    # reports (client addresses and names): there reads need the token too.
    app = web.Application(middlewares=[auth_middleware(
        getattr(server, "audit", None), settings.admin_token,
        reads_need_token=not settings.admin_on_loopback(),
        metrics_need_token=settings.metrics_auth)])

    async def health(request: web.Request) -> web.Response:
        forwarder = server.forwarder
        upstreams = {u.name: "looped" if u.looped else "up" if u.up else "down"
                     for u in forwarder.upstreams}
        healthy = "up" in upstreams.values()
        return web.json_response(
            {"status": "ok" if healthy else "degraded", "upstreams": upstreams},
            status=200 if healthy else 503,
        )

    async def metrics(request: web.Request) -> web.Response:
        body = generate_latest(server.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    gameday = getattr(server, "gameday", None)
    if gameday is not None:
        from proxy.api import add_routes

        add_routes(app, gameday, server.audit)
    return app
