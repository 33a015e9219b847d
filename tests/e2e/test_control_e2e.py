"""Several instances, one game day: three proxies on 127.0.0.2, .3 and .4,
each forwarding to the test unbound, sharing a real redis-server."""

from __future__ import annotations

import json
import time
from pathlib import Path

import dns.rcode
import pytest
import yaml

from e2e.gameday_helpers import LONG, TOKEN, api, rcode_of, write_scenarios
from support import zone
from support.dnsutil import make_query, udp
from support.net import wait_until
from support.proxy_process import ProxyLauncher
from support.redis_server import RedisServer

NOERROR, NXDOMAIN, SERVFAIL = dns.rcode.NOERROR, dns.rcode.NXDOMAIN, dns.rcode.SERVFAIL
HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
GRACE = 2.0
TWO_STEPS = {"name": "two-steps", "phases": [
    {"name": "nx", "duration": "4s",
     "rules": [{"name": "www-nx", "match": {"name": zone.WWW}, "fault": "nxdomain"}]},
    {"name": "sf", "duration": "1h",
     "rules": [{"name": "www-sf", "match": {"name": zone.WWW}, "fault": "servfail"}]}]}


class Fleet:
    def __init__(self, launcher: ProxyLauncher, redis: RedisServer, tmp: Path) -> None:
        self.launcher, self.redis, self.tmp = launcher, redis, tmp
        self.scenarios = write_scenarios(tmp / "scenarios", LONG, TWO_STEPS)
        self.proxies = [self.start(i) for i in range(3)]

    def start(self, i: int):
        return self.launcher.start(
            "--control", self.redis.url, "--control-grace", f"{GRACE}s",
            "--instance-name", f"p{i + 1}", "--scenario-dir", str(self.scenarios),
            "--report-dir", str(self.tmp / f"reports{i + 1}"),
            listen_host=HOSTS[i], config={"admin_token": TOKEN})

    def rcodes(self) -> list[int]:
        return [rcode_of(p) for p in self.proxies]


@pytest.fixture(scope="module")
def fleet(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("control")
    redis = RedisServer(tmp / "redis")
    redis.start()
    launcher = ProxyLauncher(tmp, lambda: [request.getfixturevalue("unbound")])
    try:
        f = Fleet(launcher, redis, tmp)
        for p in f.proxies:
            wait_until(lambda p=p: p.get("/ready")[0] == 200, timeout=10, what="ready")
        yield f
    finally:
        for proxy in launcher.started:
            proxy.stop()
        redis.stop()


@pytest.fixture(autouse=True)
def healed(fleet):
    yield
    status, _ = api(fleet.proxies[0], "POST", "/api/reset")
    assert status == 200


def test_a_start_on_one_is_in_force_on_all_when_it_returns(fleet):
    p1, p2, p3 = fleet.proxies
    wait_until(lambda: sorted(p.metric("dnschaos_control_leader") for p in fleet.proxies)
               == [0.0, 0.0, 1.0], timeout=6, what="one leader")
    assert [p.metric("dnschaos_control_connected") for p in fleet.proxies] == [1.0] * 3
    assert fleet.rcodes() == [NOERROR] * 3
    status, row = api(p1, "POST", "/api/scenarios/long/start")
    assert status == 201, row
    assert row["not_applied"] == []
    assert fleet.rcodes() == [NXDOMAIN] * 3  # no wait: applied everywhere on return
    runs = [api(p, "GET", "/api/runs")[1]["runs"] for p in fleet.proxies]
    assert [[r["run"] for r in rs if r["state"] == "running"] for rs in runs] == [[row["run"]]] * 3
    status, body = api(p3, "POST", f"/api/runs/{row['run']}/stop")
    assert (status, body) == (200, {"stopped": [row["run"]], "not_applied": []})
    assert fleet.rcodes() == [NOERROR] * 3


def test_pause_resume_reset_and_rules_the_same_on_all(fleet):
    p1, p2, p3 = fleet.proxies
    status, row = api(p2, "POST", "/api/scenarios/long/start")
    run = row["run"]
    assert api(p3, "POST", f"/api/runs/{run}/pause")[1] == {"paused": [run], "not_applied": []}
    assert fleet.rcodes() == [NOERROR] * 3
    states = {api(p, "GET", f"/api/runs/{run}")[1]["state"] for p in fleet.proxies}
    assert states == {"paused"}
    assert api(p1, "POST", f"/api/runs/{run}/resume")[1] == {"resumed": [run],
                                                             "not_applied": []}
    assert fleet.rcodes() == [NXDOMAIN] * 3
    status, body = api(p2, "POST", "/api/reset")
    assert (status, body) == (200, {"runs": [run], "rules": [], "not_applied": []})
    assert fleet.rcodes() == [NOERROR] * 3

    status, rule = api(p3, "POST", "/api/rules", {
        "name": "www-sf", "match": {"name": zone.WWW}, "fault": "servfail", "duration": "2s"})
    assert status == 201, rule
    assert rule["not_applied"] == []
    assert fleet.rcodes() == [SERVFAIL] * 3
    assert [[r["name"] for r in api(p, "GET", "/api/rules")[1]["rules"]]
            for p in fleet.proxies] == [["www-sf"]] * 3
    wait_until(lambda: fleet.rcodes() == [NOERROR] * 3, timeout=4, what="the rule's expiry")
    assert [api(p, "GET", "/api/rules")[1]["rules"] for p in fleet.proxies] == [[]] * 3

    api(p1, "POST", "/api/rules", {"name": "nx", "match": {"name": zone.WWW},
                                   "fault": "nxdomain"})
    assert fleet.rcodes() == [NXDOMAIN] * 3
    status, body = api(p2, "DELETE", "/api/rules/nx")
    assert (status, body) == (200, {"removed": "nx", "not_applied": []})
    assert fleet.rcodes() == [NOERROR] * 3
    assert api(p3, "DELETE", "/api/rules/nx")[0] == 404  # gone on the instance asked too


def test_the_report_merges_every_instance_once_per_client(fleet):
    p1, p2, p3 = fleet.proxies
    status, row = api(p1, "POST", "/api/scenarios/long/start")
    run = row["run"]
    sent = {("127.0.0.10", 0): 3, ("127.0.0.10", 1): 2, ("127.0.0.11", 2): 4}
    for (client, i), count in sent.items():
        for _ in range(count):
            reply = udp(make_query(zone.WWW, "A"), fleet.proxies[i].host,
                        fleet.proxies[i].port, source=client)
            assert reply.rcode() == NXDOMAIN
    udp(make_query(zone.ORIGIN, "SOA"), p3.host, p3.port, source="127.0.0.12")  # unaffected

    def live_matched(proxy):  # the live run's counts, every instance's summed
        row = api(proxy, "GET", f"/api/runs/{run}")[1]
        return row["rules"][0]["matched"] if row.get("instances") == ["p1", "p2", "p3"] \
            else None

    for proxy in fleet.proxies:
        wait_until(lambda p=proxy: live_matched(p) == 9, timeout=6, what="the live counts summed")
    api(p2, "POST", f"/api/runs/{run}/stop")

    def merged(proxy):
        status, report = api(proxy, "GET", f"/api/reports/{run}")
        return report if status == 200 and report.get("instances") == ["p1", "p2", "p3"] \
            else None

    for proxy in fleet.proxies:
        report = wait_until(lambda p=proxy: merged(p), timeout=6, what="the merged report")
        clients = {c["client"]: c["queries"] for c in report["clients"]}
        assert clients == {"127.0.0.10": 5, "127.0.0.11": 4}
        assert report["rules"][0]["matched"] == 9
        assert report["rules"][0]["clients"] == 2
    path = fleet.tmp / "reports2" / f"{run}.json"
    wait_until(lambda: path.exists() and len(json.loads(path.read_text()).get(
        "instances", [])) == 3, timeout=6, what="the merged report file")
    written = json.loads(path.read_text())
    assert {c["client"]: c["queries"] for c in written["clients"]} == {"127.0.0.10": 5,
                                                                        "127.0.0.11": 4}


def test_the_dependency_map_merges_every_instance(fleet):
    p1, p2, p3 = fleet.proxies
    sent = {("127.0.0.21", 0, zone.WWW): 2, ("127.0.0.21", 1, zone.WWW): 3,
            ("127.0.0.22", 2, zone.MX_TARGET): 1}
    for (client, i, name), count in sent.items():
        for _ in range(count):
            reply = udp(make_query(name, "A"), fleet.proxies[i].host, fleet.proxies[i].port,
                        source=client)
            assert reply.rcode() == NOERROR

    def mine(proxy):
        view = api(proxy, "GET", "/api/dependencies?suffix=example.test")[1]
        return {(c["client"], n["name"]): n["queries"] for c in view["clients"]
                if c["client"] in ("127.0.0.21", "127.0.0.22") for n in c["names"]}

    expected = {("127.0.0.21", zone.WWW): 5, ("127.0.0.22", zone.MX_TARGET): 1}
    for proxy in fleet.proxies:  # each instance's map reaches Redis within DEPS_EVERY (5 s)
        wait_until(lambda p=proxy: mine(p) == expected, timeout=8,
                   what="every instance's map merged")


def test_a_scheduled_scenario_starts_one_run_for_the_fleet(fleet):
    hourly = {"name": "hourly", "schedule": "0 * * * *", "timezone": "UTC",
              "phases": [{"name": "nx", "duration": "1h", "rules": [
                  {"name": "www-nx", "match": {"name": zone.WWW}, "fault": "nxdomain"}]}]}
    path = fleet.scenarios / "hourly.yaml"
    path.write_text(yaml.safe_dump(hourly))
    try:
        wait_until(lambda: fleet.rcodes() == [NXDOMAIN] * 3, timeout=8,
                   what="the schedule's run on every instance")
        time.sleep(1.0)  # time for a second start, if one were coming
        for proxy in fleet.proxies:
            runs = [r for r in api(proxy, "GET", "/api/runs")[1]["runs"]
                    if r["scenario"] == "hourly"]
            assert len(runs) == 1, runs
            assert runs[0]["state"] == "running"
        ids = {api(p, "GET", "/api/runs")[1]["runs"][0]["run"] for p in fleet.proxies}
        assert len(ids) == 1
    finally:
        path.unlink()


def test_an_instance_killed_mid_run_rejoins_the_current_phase(fleet):
    p1, p2, p3 = fleet.proxies
    status, row = api(p1, "POST", "/api/scenarios/two-steps/start")
    run = row["run"]
    assert fleet.rcodes() == [NXDOMAIN] * 3
    p2.proc.kill()  # kill -9
    p2.proc.wait(5)
    wait_until(lambda: rcode_of(p1) == SERVFAIL, timeout=6, what="the second phase")
    fleet.proxies[1] = p2 = fleet.start(1)
    assert rcode_of(p2) == SERVFAIL  # answers as the others do as soon as it answers
    assert fleet.rcodes() == [SERVFAIL] * 3
    mine, theirs = api(p2, "GET", f"/api/runs/{run}")[1], api(p3, "GET", f"/api/runs/{run}")[1]
    assert (mine["state"], mine["phase"], mine["started_at"]) == \
        (theirs["state"], theirs["phase"], theirs["started_at"]) == \
        ("running", "sf", row["started_at"])
    status, body = api(p2, "POST", f"/api/runs/{run}/stop")
    assert body == {"stopped": [run], "not_applied": []}
    assert fleet.rcodes() == [NOERROR] * 3


def test_without_redis_every_instance_heals_then_follows_again(fleet):
    p1, p2, p3 = fleet.proxies
    api(p3, "POST", "/api/scenarios/long/start")
    assert fleet.rcodes() == [NXDOMAIN] * 3
    fleet.redis.stop()
    stopped = time.monotonic()
    wait_until(lambda: fleet.rcodes() == [NOERROR] * 3, timeout=GRACE + 1.5,
               what="every instance healed")
    assert time.monotonic() - stopped <= GRACE + 1.0
    for proxy in fleet.proxies:
        assert proxy.metric("dnschaos_control_connected") == 0.0
        status, body, _ = proxy.get("/ready")  # ready: it answers, transparently
        assert (status, json.loads(body)["control"]["state"]) == (200, "healed")
    status, body = api(p1, "POST", "/api/scenarios/long/start")
    assert status == 503 and "nothing was changed" in body["error"]
    assert fleet.rcodes() == [NOERROR] * 3

    fleet.redis.start()  # appendonly: the log survived
    assert int(fleet.redis.command("XLEN", "dnschaos:log").lstrip(":")) >= 1
    for proxy in fleet.proxies:
        wait_until(lambda p=proxy: p.metric("dnschaos_control_connected") == 1.0, timeout=6,
                   what="following again")
        status, body, _ = proxy.get("/ready")
        assert (status, json.loads(body)["control"]["state"]) == (200, "following")
    assert fleet.rcodes() == [NOERROR] * 3  # the healed run stays ended
    status, row = api(p2, "POST", "/api/scenarios/long/start")
    assert status == 201 and row["not_applied"] == []
    assert fleet.rcodes() == [NXDOMAIN] * 3
