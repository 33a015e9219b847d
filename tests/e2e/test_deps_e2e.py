"""The dependency map, preview, preflight and recovery against real parts:
unbound, the proxy (one process and --workers 2), queries from several
loopback source addresses."""

from __future__ import annotations

import subprocess
import sys

import dns.rcode
import pytest

from support import zone
from support.dnsutil import make_query, udp
from support.net import wait_until

from .gameday_helpers import api, write_scenarios

pytestmark = pytest.mark.e2e
NX, OK, SF = dns.rcode.NXDOMAIN, dns.rcode.NOERROR, dns.rcode.SERVFAIL
C1, C2, C3 = "127.0.0.11", "127.0.0.12", "127.0.0.13"
MAIL = zone.MX_TARGET

PLANNED = {"name": "planned", "phases": [{"name": "outage", "duration": "1h", "rules": [
    {"name": "www", "match": {"name": zone.WWW, "probability": 0.5}, "fault": "nxdomain"},
    {"name": "mail-c2", "match": {"name": MAIL, "clients": [f"{C2}/32"]}, "fault": "servfail"},
    {"name": "dynamo", "match": {"name": "dynamodb.us-east-1.amazonaws.com"},
     "fault": "servfail"},
]}]}
OUTAGE = {"name": "outage", "phases": [{"name": "break", "duration": "2s", "rules": [
    {"name": "www-mail", "match": {"name": [zone.WWW, MAIL]}, "fault": "nxdomain"}]}]}


def ask(proxy, name: str, source: str, rdtype: str = "A") -> int:
    return udp(make_query(name, rdtype), proxy.host, proxy.port, source=source).rcode()


def send_traffic(proxy) -> None:
    for _ in range(3):
        assert ask(proxy, zone.WWW, C1) == OK
    assert ask(proxy, zone.WWW, C1, "AAAA") == OK
    assert ask(proxy, MAIL, C2) == OK
    assert ask(proxy, MAIL, C2) == OK
    assert ask(proxy, zone.NXDOMAIN_NAME, C2) == NX
    assert ask(proxy, zone.WWW, C3) == OK


def summary(view: dict) -> dict:
    return {c["client"]: {n["name"]: (n["queries"], n["qtypes"],
                                      {k: v for k, v in n["answers"].items() if v})
                          for n in c["names"]} for c in view["clients"]}


EXPECTED = {
    C1: {zone.WWW: (4, {"A": 3, "AAAA": 1}, {"data": 4})},
    C2: {MAIL: (2, {"A": 2}, {"data": 2}), zone.NXDOMAIN_NAME: (1, {"A": 1}, {"nxdomain": 1})},
    C3: {zone.WWW: (1, {"A": 1}, {"data": 1})},
}


def test_map_preview_and_preflight(start_proxy, tmp_path):
    write_scenarios(tmp_path / "scenarios", PLANNED)
    proxy = start_proxy("--scenario-dir", str(tmp_path / "scenarios"),
                        config={"client_groups": {f"{C3}/32": "batch"}})
    send_traffic(proxy)
    status, view = api(proxy, "GET", "/api/dependencies")
    assert status == 200
    assert summary(view) == {C1: EXPECTED[C1], C2: EXPECTED[C2], "batch": EXPECTED[C3]}
    assert [c["addresses"] for c in view["clients"]] == [[C1], [C2], [C3]]
    assert view["clients_overflow"] == 0
    status, by_name = api(proxy, "GET", "/api/dependencies?by=name")
    assert [(n["name"], n["queries"], [c["client"] for c in n["clients"]])
            for n in by_name["names"]] == [(zone.WWW, 5, [C1, "batch"]), (MAIL, 2, [C2]),
                                           (zone.NXDOMAIN_NAME, 1, [C2])]
    _, only = api(proxy, "GET", f"/api/dependencies?client={C2}&suffix=mail.example.test")
    assert summary(only) == {C2: {MAIL: EXPECTED[C2][MAIL]}}
    assert api(proxy, "GET", "/api/dependencies?bogus=1")[0] == 400
    _, recent = api(proxy, "GET", "/api/dependencies?since=1h")
    assert summary(recent) == summary(view) and recent["since"] == recent["now"] - 3600
    _, future = api(proxy, "GET", f"/api/dependencies?since={recent['now'] + 60}")
    assert future["clients"] == []

    status, preview = api(proxy, "POST", "/api/preview", {"scenario": "planned"})
    assert status == 200 and preview["window"] == 3600.0
    rules = {r["name"]: r for r in preview["phases"][0]["rules"]}
    assert [(c["client"], c["queries"], c["expected_faults"]) for c in rules["www"]["clients"]
            ] == [(C1, 4, 2.0), (C3, 1, 0.5)]
    assert rules["www"]["expected_faults"] == 2.5
    # mail-c2 selects C2's mail queries only, not C2's nosuch name nor anyone else's.
    assert [(c["client"], [(n["name"], n["queries"]) for n in c["names"]])
            for c in rules["mail-c2"]["clients"]] == [(C2, [(MAIL, 2)])]
    assert rules["dynamo"]["clients"] == [] and rules["dynamo"]["queries"] == 0
    warnings = preview["preflight"]["warnings"]
    assert [(w["kind"], w["rule"]) for w in warnings] == [("no_traffic", "outage/dynamo")]
    assert warnings[0]["message"].startswith(
        "no client asked for dynamodb.us-east-1.amazonaws.com in the last hour")
    # An inline scenario: a rule for clients never seen.
    inline = {"name": "inline", "phases": [{"name": "p", "duration": "1m", "rules": [
        {"match": {"suffix": "example.test", "clients": ["10.9.0.0/16"]}, "fault": "drop"}]}]}
    _, other = api(proxy, "POST", "/api/preview", {"scenario": inline, "window": "10m"})
    assert [(w["kind"], w["rule"]) for w in other["preflight"]["warnings"]] == [
        ("no_traffic", "p/p/0"), ("unseen_client", "p/p/0")]

    status, refused = api(proxy, "POST", "/api/scenarios/planned/start",
                          {"require_traffic": True})
    assert status == 409 and refused["preflight"]["selects_nothing"] == ["outage/dynamo"]
    _, runs = api(proxy, "GET", "/api/runs")
    assert runs["runs"] == []  # nothing started
    status, started = api(proxy, "POST", "/api/scenarios/planned/start", {})
    assert status == 201
    assert [w["kind"] for w in started["preflight"]["warnings"]] == ["no_traffic"]

    env = {"DNSCHAOS_API": proxy.admin_url, "PYTHONPATH": "."}
    out = subprocess.run([sys.executable, "-m", "proxy", "deps", "--csv", "--client", C2],
                         capture_output=True, text=True, env=env, check=True).stdout
    assert out.splitlines() == [
        "client,name,queries,qtypes,data,nodata,nxdomain,servfail,refused,timeout,other",
        f"{C2},{MAIL},2,A:2,2,0,0,0,0,0,0",
        f"{C2},{zone.NXDOMAIN_NAME},1,A:1,0,0,1,0,0,0,0"]
    dot = subprocess.run([sys.executable, "-m", "proxy", "deps", "--dot"], capture_output=True,
                         text=True, env=env, check=True).stdout
    assert f'"batch" -> "{zone.WWW}" [label=1];' in dot
    shown = subprocess.run([sys.executable, "-m", "proxy", "preview", "planned"],
                           capture_output=True, text=True, env=env, check=True)
    assert "preflight: no_traffic: no client asked for dynamodb" in shown.stderr
    assert f"mail-c2  servfail  {C2}" in shown.stdout
    refused_cli = subprocess.run([sys.executable, "-m", "proxy", "scenario", "start", "planned",
                                  "--require-traffic"], capture_output=True, text=True, env=env)
    assert refused_cli.returncode != 0
    assert "HTTP 409: require_traffic: rules that would select no query: outage/dynamo" in (
        refused_cli.stderr)
    started_cli = subprocess.run([sys.executable, "-m", "proxy", "scenario", "start", "planned"],
                                 capture_output=True, text=True, env=env, check=True)
    assert started_cli.stderr.startswith("preflight: no_traffic: no client asked for dynamodb")


def test_recovery_after_a_run(start_proxy, tmp_path):
    """C1 comes back, C2 keeps failing (its upstream, a second proxy, answers
    SERVFAIL for mail), C3 stops asking."""
    upstream = start_proxy(admin=True)
    write_scenarios(tmp_path / "scenarios", OUTAGE)
    proxy = start_proxy("--scenario-dir", str(tmp_path / "scenarios"), upstreams=[upstream],
                        config={"recovery_window": "4s"})
    assert ask(proxy, zone.WWW, C1) == OK
    assert ask(proxy, MAIL, C2) == OK
    assert ask(proxy, zone.WWW, C3) == OK
    status, rule = api(upstream, "POST", "/api/rules", {
        "name": "mail-down", "match": {"name": MAIL}, "fault": "servfail", "duration": "5m"},
        token=None)
    assert status == 201, rule
    status, run = api(proxy, "POST", "/api/scenarios/outage/start", {}, token=None)
    assert status == 201
    assert run["recovery"] is None  # live: nothing to watch yet
    assert ask(proxy, zone.WWW, C1) == NX
    assert ask(proxy, MAIL, C2) == NX
    assert ask(proxy, zone.WWW, C3) == NX
    run_id = run["run"]
    ended = wait_until(lambda: (lambda r: r if r.get("state") == "ended" else None)(
        api(proxy, "GET", f"/api/runs/{run_id}")[1]), timeout=10, what="the run's end")
    assert [(e["client"], e["name"], e["status"]) for e in ended["recovery"]["entries"]] == [
        (C1, zone.WWW, "watching"), (C2, MAIL, "watching"), (C3, zone.WWW, "watching")]
    assert proxy.metric("dnschaos_unrecovered_clients", run=run_id) == 3
    assert ask(proxy, zone.WWW, C1) == OK
    assert ask(proxy, MAIL, C2) == SF  # the upstream itself fails

    def live():
        row = api(proxy, "GET", f"/api/runs/{run_id}")[1]["recovery"]
        return row if row["entries"][1]["status"] == "failing" else None

    row = wait_until(live, timeout=3, what="recovery seen")
    assert row["closed"] is False
    c1 = row["entries"][0]
    assert c1["status"] == "recovered" and 0 <= c1["after"] < 4
    assert row["entries"][2]["status"] == "watching"
    assert proxy.metric("dnschaos_unrecovered_clients", run=run_id) == 2

    def closed():
        row = api(proxy, "GET", f"/api/runs/{run_id}")[1]["recovery"]
        return row if row["closed"] else None

    final = wait_until(closed, timeout=8, what="the recovery window to close")
    assert [(e["client"], e["status"]) for e in final["entries"]] == [
        (C1, "recovered"), (C2, "failing"), (C3, "unseen")]
    _, report = api(proxy, "GET", f"/api/reports/{run_id}")
    assert report["recovery"] == final
    md = proxy.get(f"/api/reports/{run_id}?format=md")[1]
    assert "## Recovery" in md and f"| {C3} | {zone.WWW} | unseen |  |" in md
    env = {"DNSCHAOS_API": proxy.admin_url, "PYTHONPATH": "."}
    shown = subprocess.run([sys.executable, "-m", "proxy", "recovery", "outage"],
                           capture_output=True, text=True, env=env, check=True).stdout
    lines = shown.splitlines()
    assert lines[0] == f"run {run_id}: recovery window 4 s, closed"
    assert lines[2].split() == ["CLIENT", "NAME", "STATUS", "AFTER"]
    assert [(e["client"], e["name"], e["status"]) for e in final["entries"]] == [
        tuple(line.split()[:3]) for line in lines[3:]]


def proxy_workers(proxy) -> list[dict]:
    """Per worker: its queries, from dnschaos_worker_queries_total."""
    return [{"worker": w, "queries": proxy.metric("dnschaos_worker_queries_total", worker=w)}
            for w in ("0", "1")]


def test_workers_merge_their_maps(start_proxy):
    proxy = start_proxy("--workers", "2")
    for _ in range(10):  # a fresh socket each: SO_REUSEPORT spreads them
        assert ask(proxy, zone.WWW, C1) == OK
    for _ in range(6):
        assert ask(proxy, MAIL, C2) == OK
    _, view = api(proxy, "GET", "/api/dependencies", token=None)
    assert summary(view) == {C1: {zone.WWW: (10, {"A": 10}, {"data": 10})},
                             C2: {MAIL: (6, {"A": 6}, {"data": 6})}}
    # Both workers answered some: each kept its own map, merged here.
    served = [w["queries"] for w in proxy_workers(proxy)]
    assert min(served) > 0 and sum(served) >= 16
