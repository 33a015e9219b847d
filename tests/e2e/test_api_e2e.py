"""The admin API: token enforced, mutations audited, ad hoc rules, and every
route documented in docs/openapi.yaml (and nothing more)."""

from __future__ import annotations

import json
from pathlib import Path

import dns.rcode
import pytest
import yaml

from support import zone
from support.net import wait_until

from .gameday_helpers import LONG, TOKEN, api, rcode_of, write_scenarios

ROOT = Path(__file__).resolve().parents[2]
NX, OK, REFUSED = dns.rcode.NXDOMAIN, dns.rcode.NOERROR, dns.rcode.REFUSED


def test_every_route_is_documented() -> None:
    from proxy.admin import make_app
    from proxy.config import Settings
    from proxy.server import Server

    server = Server(Settings(upstreams=["127.0.0.1:53"]))
    app = make_app(server)
    routes = {(r.method.lower(), r.resource.canonical) for r in app.router.routes()
              if r.method != "HEAD"}
    spec = yaml.safe_load((ROOT / "docs" / "openapi.yaml").read_text())
    documented = {(method, path) for path, ops in spec["paths"].items() for method in ops}
    assert routes == documented
    assert spec["openapi"].startswith("3.")


@pytest.fixture(scope="module")
def proxy(start_module_proxy, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api")
    write_scenarios(tmp / "scenarios", LONG)
    proxy = start_module_proxy("--scenario-dir", str(tmp / "scenarios"),
                               "--audit-log", str(tmp / "audit.jsonl"),
                               config={"admin_token": TOKEN})
    proxy.tmp = tmp
    return proxy


def audit_lines(proxy) -> list[dict]:
    return [json.loads(line) for line in (proxy.tmp / "audit.jsonl").read_text().splitlines()]


def test_token_is_enforced_and_refusals_audited(proxy):
    assert api(proxy, "POST", "/api/scenarios/long/start", {}, token=None)[0] == 401
    assert api(proxy, "POST", "/api/reset", {}, token="wrong")[0] == 401
    assert api(proxy, "DELETE", "/api/rules/x", token=None)[0] == 401
    assert rcode_of(proxy) == OK  # nothing started
    assert api(proxy, "GET", "/api/status", token=None)[0] == 200  # reads are open
    denied = [e for e in audit_lines(proxy) if e["result"].startswith("denied")]
    assert [e["result"] for e in denied[-3:]] == ["denied: no token", "denied: wrong token",
                                                  "denied: no token"]
    assert denied[-1]["from"] == "127.0.0.1" and denied[-1]["who"] == "tester"


def test_mutations_are_audited(proxy):
    status, run = api(proxy, "POST", "/api/scenarios/long/start", {"time_scale": 0.5},
                      user="alice")
    assert status == 201
    api(proxy, "POST", f"/api/runs/{run['run']}/stop", {}, user="bob")
    entries = audit_lines(proxy)
    start = next(e for e in entries if e["action"] == "start" and e["who"] == "alice (token)")
    assert start["target"] == "long" and start["details"]["run"] == run["run"]
    assert start["details"]["request"] == {"time_scale": 0.5} and start["result"] == "ok"
    assert start["time"].endswith("Z")
    stop = next(e for e in entries if e["action"] == "stop" and e["who"] == "bob (token)")
    assert stop["target"] == run["run"]
    assert api(proxy, "POST", "/api/scenarios/nosuch/start", {})[0] == 404
    assert audit_lines(proxy)[-1]["result"].startswith("error 404")


def test_adhoc_rule_with_expiry(proxy):
    body = {"name": "www-refused", "match": {"name": zone.WWW}, "fault": "refused",
            "duration": "1.5s"}
    status, rule = api(proxy, "POST", "/api/rules", body)
    assert status == 201 and rule["name"] == "www-refused" and rule["remaining"] <= 1.5
    assert rcode_of(proxy) == REFUSED
    assert api(proxy, "POST", "/api/rules", body)[0] == 409
    assert [r["name"] for r in api(proxy, "GET", "/api/rules")[1]["rules"]] == ["www-refused"]
    wait_until(lambda: rcode_of(proxy) == OK, timeout=5, interval=0.1, what="expiry")
    assert api(proxy, "GET", "/api/rules")[1]["rules"] == []
    # Removed by hand, before its expiry.
    api(proxy, "POST", "/api/rules", dict(body, duration="5m"))
    assert rcode_of(proxy) == REFUSED
    assert api(proxy, "DELETE", "/api/rules/www-refused") == (200, {"removed": "www-refused"})
    assert rcode_of(proxy) == OK
    assert api(proxy, "DELETE", "/api/rules/www-refused")[0] == 404


def test_rule_add_audit_names_the_rule(proxy):
    body = {"name": "audited-rule", "match": {"name": zone.WWW}, "fault": "refused",
            "duration": "5m"}
    assert api(proxy, "POST", "/api/rules", body, user="carol")[0] == 201
    assert api(proxy, "DELETE", "/api/rules/audited-rule", user="carol")[0] == 200
    entries = [e for e in audit_lines(proxy) if e["who"] == "carol (token)"]
    assert [(e["action"], e["target"]) for e in entries] == [
        ("rule_add", "audited-rule"), ("rule_remove", "audited-rule")]
    # A mutation that names nothing still has no target.
    api(proxy, "POST", "/api/reset", {}, user="dave")
    assert [e["target"] for e in audit_lines(proxy) if e["who"] == "dave (token)"] == [None]


def test_invalid_requests_say_why(proxy):
    status, out = api(proxy, "POST", "/api/rules", {"name": "x", "fault": "nxdomian",
                                                    "match": {"name": zone.WWW}})
    assert status == 400 and "unknown fault 'nxdomian'" in out["error"]
    status, out = api(proxy, "POST", "/api/scenarios/long/start", {"at": "tomorrow"})
    assert status == 400 and "invalid time" in out["error"]
    status, out = api(proxy, "POST", "/api/scenarios/long/start", {"at": "2000-01-01T00:00Z"})
    assert status == 400 and "already be over" in out["error"]
    assert api(proxy, "GET", "/api/runs/nosuch")[0] == 404


def test_show_and_status(proxy):
    status, scenario = api(proxy, "GET", "/api/scenarios/long")
    assert status == 200 and scenario["phases"][0]["name"] == "outage"
    assert scenario["phases"][0]["rules"][0]["name"] == "www-nx"
    status, run = api(proxy, "POST", "/api/scenarios/long/start", {})
    _, st = api(proxy, "GET", "/api/status")
    (row,) = st["runs"]
    assert (row["run"], row["phase"], row["state"]) == (run["run"], "outage", "running")
    assert 3590 < row["remaining"] <= 3600
    api(proxy, "POST", "/api/reset", {})
    assert api(proxy, "GET", "/api/status")[1]["runs"] == []
    status, text = api(proxy, "GET", f"/api/reports/{run['run']}?format=md")
    assert status == 200 and text.startswith("# Game day report: long")


def test_admin_off_loopback_needs_a_token(start_proxy):
    from support.proxy_process import ProxyStartError

    with pytest.raises(ProxyStartError, match="not on loopback"):
        start_proxy("--admin", "0.0.0.0:0", admin=False, ready_timeout=5)
