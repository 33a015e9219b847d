"""Who may read the admin listener: off loopback (a wildcard address here,
reached through 127.0.0.1, so no traffic leaves the machine) every endpoint
but /health and /metrics needs the token, reads too; /metrics too with
--metrics-auth; a short token is refused at start; on loopback reads stay
open."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from support.proxy_process import ProxyStartError

from .gameday_helpers import LONG, TOKEN, api, write_scenarios

ROOT = Path(__file__).resolve().parents[2]
READS = ["/api/status", "/api/scenarios", "/api/scenarios/long", "/api/runs", "/api/rules",
         "/api/reports"]


def get(proxy, path: str, token: str | None = None) -> int:
    return api(proxy, "GET", path, token=token)[0]


@pytest.fixture(scope="module")
def wildcard(start_module_proxy, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("auth")
    write_scenarios(tmp / "scenarios", LONG)
    return start_module_proxy("--scenario-dir", str(tmp / "scenarios"), admin_host="0.0.0.0",
                              config={"admin_token": TOKEN})


def test_off_loopback_reads_need_the_token(wildcard):
    assert wildcard.argv[wildcard.argv.index("--admin") + 1].startswith("0.0.0.0:")
    for path in READS:
        assert get(wildcard, path) == 401, path
        assert get(wildcard, path, token="wrong-token-wrong-token") == 401, path
        assert get(wildcard, path, token=TOKEN) == 200, path
    assert get(wildcard, "/api/nosuch") == 401  # unknown paths tell nothing either
    assert api(wildcard, "POST", "/api/reset", {}, token=None)[0] == 401
    assert api(wildcard, "POST", "/api/reset", {}, token=TOKEN)[0] == 200


def test_off_loopback_health_and_metrics_stay_open(wildcard):
    assert get(wildcard, "/health") == 200
    status, body, _ = wildcard.get("/metrics")
    assert status == 200 and "dnschaos_" in body


def test_cli_sends_the_token_for_reads(wildcard):
    def cli(*args: str):
        return subprocess.run([sys.executable, "-m", "proxy", *args, "--admin",
                               wildcard.admin_url], cwd=ROOT, capture_output=True, text=True,
                              timeout=30)

    refused = cli("scenario", "list")
    assert refused.returncode == 2 and "HTTP 401" in refused.stderr
    allowed = cli("scenario", "list", "--token", TOKEN)
    assert allowed.returncode == 0 and "long" in allowed.stdout, allowed.stderr


def test_metrics_auth_puts_metrics_behind_the_token(start_proxy):
    proxy = start_proxy("--metrics-auth", admin_host="0.0.0.0", config={"admin_token": TOKEN})
    assert get(proxy, "/metrics") == 401
    assert get(proxy, "/metrics", token=TOKEN) == 200
    assert get(proxy, "/health") == 200


def test_metrics_auth_without_a_token_is_refused(start_proxy):
    with pytest.raises(ProxyStartError, match="metrics_auth needs admin_token"):
        start_proxy("--metrics-auth", ready_timeout=5)


@pytest.mark.parametrize("admin_host", ["0.0.0.0", "127.0.0.1"])
def test_a_short_token_is_refused_at_start(start_proxy, admin_host):
    with pytest.raises(ProxyStartError) as info:
        start_proxy(admin_host=admin_host, config={"admin_token": "x" * 15}, ready_timeout=5)
    assert "admin_token is 15 characters long: use at least 16" in str(info.value)
    assert "x" * 15 not in str(info.value)  # the token itself is not printed
    proxy = start_proxy(admin_host=admin_host, config={"admin_token": "x" * 16})
    assert get(proxy, "/health") == 200


def test_short_token_exit_status_and_one_line(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("admin_token: fifteen-chars-x\n")
    proc = subprocess.run([sys.executable, "-m", "proxy", "run", "--config", str(config),
                           "--upstream", "127.0.0.1:9", "--listen", "127.0.0.1:0",
                           "--admin", "127.0.0.1:0"], cwd=ROOT, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        "dnschaos: admin_token is 15 characters long: use at least 16 "
        "(e.g. the output of `openssl rand -hex 16`)"]


def test_on_loopback_reads_stay_open(start_proxy, tmp_path):
    write_scenarios(tmp_path / "s", LONG)
    open_proxy = start_proxy("--scenario-dir", str(tmp_path / "s"))  # no token at all
    with_token = start_proxy("--scenario-dir", str(tmp_path / "s"), config={"admin_token": TOKEN})
    for proxy in (open_proxy, with_token):
        for path in READS:
            assert get(proxy, path) == 200, path
        assert get(proxy, "/metrics") == 200
    # Mutations: open without a token, behind it with one.
    assert api(open_proxy, "POST", "/api/reset", {}, token=None)[0] == 200
    assert api(with_token, "POST", "/api/reset", {}, token=None)[0] == 401
