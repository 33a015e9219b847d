"""Each probe kind against a real server on loopback: pass and fail."""

from __future__ import annotations

import sys

import pytest
from aiohttp import web

from proxy.core.model import Probe
from proxy.gameday.probes import check


@pytest.fixture
async def server():
    """An HTTP server on 127.0.0.1 with a healthy and a failing endpoint, and a
    Prometheus query API whose answer the test sets."""
    answer: dict = {"value": "0"}

    async def healthy(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def failing(request: web.Request) -> web.Response:
        return web.Response(status=503, text="down")

    async def query(request: web.Request) -> web.Response:
        assert request.query["query"] == "rate(errors_total[1m])"
        return web.json_response({"status": "success", "data": {
            "resultType": "vector",
            "result": [{"metric": {}, "value": [0, answer["value"]]}]}})

    app = web.Application()
    app.router.add_get("/healthy", healthy)
    app.router.add_get("/failing", failing)
    app.router.add_get("/api/v1/query", query)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}", answer
    await runner.cleanup()


async def test_http_probe_passes_on_2xx_and_fails_otherwise(server):
    base, _ = server
    assert await check(Probe(name="up", http=f"{base}/healthy")) == (True, "HTTP 200")
    assert await check(Probe(name="down", http=f"{base}/failing")) == (False, "HTTP 503")


async def test_prometheus_probe_compares_with_its_maximum(server):
    base, answer = server
    probe = Probe.model_validate({"name": "errors", "prometheus": {
        "url": base, "query": "rate(errors_total[1m])", "max": 0.5}})
    answer["value"] = "0.2"
    assert await check(probe) == (True, "value 0.2 (max 0.5)")
    answer["value"] = "0.9"
    assert await check(probe) == (False, "value 0.9 (max 0.5)")


async def test_command_probe_passes_on_exit_0():
    ok = Probe(name="ok", command=[sys.executable, "-c", "pass"])
    bad = Probe(name="bad", command=[sys.executable, "-c", "import sys; sys.exit(3)"])
    assert (await check(ok))[0] is True
    passed, seen = await check(bad)
    assert not passed and seen.startswith("exit 3")


async def test_an_unreachable_target_is_a_failed_check():
    passed, seen = await check(Probe(name="nobody", http="http://127.0.0.1:9/", timeout=2))
    assert not passed and seen
