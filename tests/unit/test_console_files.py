"""The console's files as the admin app serves them (no listener, no browser:
aiohttp's test client on the real app): the page, its strict CSP, the
route list, and the token model (the files are open even where every read
needs the token; the API behind them is not)."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from proxy.admin import make_app
from proxy.config import Settings
from proxy.console import FILES, HERE
from proxy.server import Server

TOKEN = "s3cret-token-for-tests"


async def client_for(**settings) -> TestClient:
    server = Server(Settings(upstreams=["127.0.0.1:53"], **settings))
    client = TestClient(TestServer(make_app(server)))
    await client.start_server()
    return client


@pytest.mark.parametrize("admin", ["127.0.0.1:5380", "0.0.0.0:5380"])
async def test_page_and_files_are_served_with_a_strict_csp(admin: str) -> None:
    client = await client_for(admin=admin, admin_token=TOKEN)
    try:
        page = await client.get("/")
        assert page.status == 200 and page.content_type == "text/html"
        csp = page.headers["Content-Security-Policy"]
        assert csp.split("; ")[0] == "default-src 'self'"
        text = await page.text()
        assert '<script src="/console/console.js" defer></script>' in text
        assert "<script>" not in text and " on" + "click=" not in text  # nothing inline
        for name, kind in FILES.items():
            response = await client.get(f"/console/{name}")
            assert (response.status, response.content_type) == (200, kind)
            assert await response.read() == (HERE / name).read_bytes()
        assert (await client.get("/console/__init__.py")).status == 404
        assert (await client.get("/console/..%2f__init__.py")).status == 404
        # The data behind the page keeps its rules: off loopback reads need
        # the token, on loopback they do not; mutations always do.
        status = (await client.get("/api/status")).status
        assert status == (401 if admin.startswith("0.0.0.0") else 200)
        assert (await client.post("/api/reset", json={})).status == 401
        authorized = await client.get("/api/status",
                                      headers={"Authorization": f"Bearer {TOKEN}"})
        assert authorized.status == 200
    finally:
        await client.close()


def test_the_files_are_package_data() -> None:
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    patterns = pyproject.split('"proxy.console" = [', 1)[1].split("]", 1)[0]
    assert {Path(name).suffix for name in FILES} == {
        p.strip().strip('"').lstrip("*") for p in patterns.split(",")}
