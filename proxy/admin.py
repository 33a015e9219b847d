"""The admin HTTP listener: health, metrics, the game-day API (proxy/api.py)
and its console page (proxy/console/), served by aiohttp in the proxy's own event loop.

With worker processes, a request that reads traffic counts first gathers
them from the workers (awaited, never blocking the loop), and a request
that changes state returns once every worker applies the change."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from proxy.affected import ClientGroups
from proxy.api import Handler, add_routes, auth_middleware
from proxy.config import Settings
from proxy.console import add_console_routes
from proxy.gameday.audit import AuditLog
from proxy.gameday.runs import GameDay
from proxy.metrics import UpstreamCounts


class Upstreams(Protocol):
    @property
    def upstreams(self) -> Sequence[UpstreamCounts]: ...


class Served(Protocol):
    """What the admin listener serves (a proxy.server.Server)."""

    settings: Settings
    audit: AuditLog
    gameday: GameDay
    registry: CollectorRegistry

    @property
    def forwarder(self) -> Upstreams: ...

    async def refresh(self, parts: tuple[str, ...] = ..., timeout: float = ...) -> None: ...

    async def settle(self) -> None: ...

HEALTH_TIMEOUT = 0.5
"""Seconds /health waits for the workers' upstream views; a late worker's
last known view is used."""
READS = ("GET", "HEAD")
DEPS_PATHS = ("/api/dependencies", "/api/preview", "/api/scenarios/", "/api/runs",
              "/api/reset")
"""Requests that read the dependency map (preview, preflight at start, recovery)."""


def make_app(server: Served) -> web.Application:
    settings = server.settings

    @web.middleware
    async def in_step(request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        if path == "/health":
            await server.refresh(("forwarder",), HEALTH_TIMEOUT)
        elif path == "/metrics":
            await server.refresh()
        elif path.startswith(DEPS_PATHS):  # ...and the dependency map
            await server.refresh(("stats", "clients", "deps"))
        elif path.startswith("/api/"):  # rule and run counts, reports
            await server.refresh(("stats", "clients"))
        response = await handler(request)
        if request.method not in READS:
            await server.settle()
        return response

    # Off loopback, anyone on the network could read the runs, rules and
    # reports (client addresses and names): there reads need the token too.
    app = web.Application(middlewares=[auth_middleware(
        server.audit, settings.admin_token,
        reads_need_token=not settings.admin_on_loopback(),
        metrics_need_token=settings.metrics_auth), in_step])

    async def health(request: web.Request) -> web.Response:
        upstreams = {u.name: "looped" if u.looped else "up" if u.up else "down"
                     for u in server.forwarder.upstreams}
        healthy = "up" in upstreams.values()
        return web.json_response(
            {"status": "ok" if healthy else "degraded", "upstreams": upstreams},
            status=200 if healthy else 503,
        )

    async def metrics(request: web.Request) -> web.Response:
        body = generate_latest(server.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def ready(request: web.Request) -> web.Response:
        """Readiness: listening, and with a control plane following it (joined;
        or healed, answering transparently).  Not upstream health: a dead
        upstream is a fault passed on as SERVFAIL, not a reason to take the
        only endpoint away."""
        control = getattr(server, "control", None)
        ready = control is None or control.ready()
        body: dict[str, object] = {"status": "ready" if ready else "joining the control plane"}
        if control is not None:
            body["control"] = {
                "state": "healed" if control.healed else "following" if control.following()
                else "unreachable" if control.joined else "joining",
                "connected": control.connected, "applied": control.applied,
                "instance": control.name, "leader": control.leader}
        return web.json_response(body, status=200 if ready else 503)

    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics)
    add_routes(app, server.gameday, server.audit, ClientGroups(settings.client_groups),
               getattr(server, "control", None))
    add_console_routes(app)
    return app
