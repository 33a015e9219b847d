"""Game days against the running proxy: a scenario started through the API
changes real answers at phase boundaries and reverts at the end; stop,
pause/resume, the time limit, a probe, --at and a cron schedule."""

from __future__ import annotations

import json
import threading
import time

import dns.rcode
import pytest

from support import zone
from support.dnsutil import addresses, make_query, udp
from support.net import wait_until

from .gameday_helpers import (
    LONG,
    SLOW,
    TOKEN,
    TWO_PHASES,
    api,
    rcode_of,
    run_state,
    wait_rcode,
    wait_state,
    write_scenarios,
)

pytestmark = pytest.mark.e2e

NX, SF, OK = dns.rcode.NXDOMAIN, dns.rcode.SERVFAIL, dns.rcode.NOERROR


@pytest.fixture
def gameday(start_proxy, tmp_path):
    """A proxy with a scenario directory, a report directory, a token and an audit log."""

    def start(*scenarios: dict, extra: tuple[str, ...] = ()):
        write_scenarios(tmp_path / "scenarios", *scenarios)
        proxy = start_proxy("--scenario-dir", str(tmp_path / "scenarios"),
                            "--report-dir", str(tmp_path / "reports"),
                            "--audit-log", str(tmp_path / "audit.jsonl"), *extra,
                            config={"admin_token": TOKEN})
        proxy.tmp = tmp_path
        return proxy

    return start


def test_phases_change_answers_then_revert(gameday):
    proxy = gameday(TWO_PHASES)
    assert rcode_of(proxy) == OK
    status, run = api(proxy, "POST", "/api/scenarios/two-phases/start", {})
    assert status == 201, run
    assert run["state"] == "running" and run["phase"] == "nx"
    assert rcode_of(proxy) == NX
    assert rcode_of(proxy, zone.MX_TARGET) == OK  # other names untouched
    wait_state(proxy, run["run"], "running")
    wait_until(lambda: run_state(proxy, run["run"])["phase"] == "sf", timeout=5, interval=0.1)
    assert rcode_of(proxy) == SF
    wait_rcode(proxy, OK)  # the end: everything reverts
    reply = udp(make_query(zone.WWW, "A"), proxy.host, proxy.port)
    assert addresses(reply) == set(zone.WWW_A)
    status, report = api(proxy, "GET", f"/api/reports/{run['run']}")
    assert status == 200 and report["ended"] == "completed"
    assert [p["phase"] for p in report["timeline"]] == ["nx", "sf"]
    assert report["clients"][0]["client"] == "127.0.0.1"
    assert set(report["clients"][0]["faults"]) == {"nxdomain", "servfail"}
    assert zone.WWW.rstrip(".") in report["names"]
    files = sorted(p.name for p in (proxy.tmp / "reports").iterdir())
    assert files == [f"{run['run']}.json", f"{run['run']}.md"]
    assert "127.0.0.1" in (proxy.tmp / "reports" / f"{run['run']}.md").read_text()


def test_stop_releases_delayed_queries_and_is_idempotent(gameday):
    proxy = gameday(SLOW)
    status, run = api(proxy, "POST", "/api/scenarios/slow/start", {})
    assert status == 201
    got: dict = {}

    def ask():
        # The client gives up after 10 s, before the 20 s delay: a reply at
        # all says the stop released the query.
        got["reply"] = udp(make_query(zone.WWW, "A"), proxy.host, proxy.port, timeout=10)

    thread = threading.Thread(target=ask)
    thread.start()
    wait_until(lambda: run_state(proxy, run["run"])["rules"][0]["matched"] >= 1, timeout=5,
               interval=0.05)
    assert api(proxy, "POST", f"/api/runs/{run['run']}/stop", {"reason": "enough"}) == (
        200, {"stopped": [run["run"]]})
    thread.join(15)
    assert "reply" in got, "not released by the stop"
    assert addresses(got["reply"]) == set(zone.WWW_A)
    assert api(proxy, "POST", f"/api/runs/{run['run']}/stop", {}) == (200, {"stopped": []})
    _, report = api(proxy, "GET", f"/api/reports/{run['run']}")
    assert report["ended"] == "stopped" and "enough" in report["ended_because"]


def test_pause_and_resume(gameday):
    proxy = gameday(LONG)
    _, run = api(proxy, "POST", "/api/scenarios/long/start", {})
    assert rcode_of(proxy) == NX
    assert api(proxy, "POST", "/api/runs/long/pause", {})[1] == {"paused": [run["run"]]}
    assert rcode_of(proxy) == OK
    assert run_state(proxy, run["run"])["state"] == "paused"
    assert api(proxy, "POST", f"/api/runs/{run['run']}/resume", {})[1] == {
        "resumed": [run["run"]]}
    assert rcode_of(proxy) == NX
    status, out = api(proxy, "POST", "/api/reset", {})
    assert status == 200 and out["runs"] == [run["run"]]
    assert rcode_of(proxy) == OK
    _, report = api(proxy, "GET", f"/api/reports/{run['run']}")
    assert [e["event"] for e in report["events"]] == ["started", "paused", "resumed", "reset"]


def test_time_limit_reverts(gameday):
    proxy = gameday(LONG)
    _, run = api(proxy, "POST", "/api/scenarios/long/start", {"max_duration": "1.5s"})
    assert rcode_of(proxy) == NX
    wait_rcode(proxy, OK)
    _, report = api(proxy, "GET", f"/api/reports/{run['run']}")
    assert report["ended"] == "max_duration" and "1.5s" in report["ended_because"]


def test_probe_aborts_the_run(gameday, tmp_path):
    flag = tmp_path / "broken"
    probed = dict(LONG, name="probed", probes=[
        {"name": "flag-absent", "command": ["test", "!", "-e", str(flag)],
         "interval": "200ms", "failures": 2}])
    proxy = gameday(probed)
    _, run = api(proxy, "POST", "/api/scenarios/probed/start", {})
    time.sleep(0.6)
    assert rcode_of(proxy) == NX  # the probe passes: the run goes on
    flag.write_text("")
    wait_rcode(proxy, OK)
    _, report = api(proxy, "GET", f"/api/reports/{run['run']}")
    assert report["ended"] == "aborted"
    assert report["ended_because"].startswith("probe flag-absent failed 2 time(s) in a row")
    assert report["probes"][0]["failed"] >= 2


def test_dry_run_changes_nothing_but_counts(gameday):
    proxy = gameday(LONG)
    _, run = api(proxy, "POST", "/api/scenarios/long/start", {"dry_run": True})
    assert run["dry_run"]
    for _ in range(3):
        assert rcode_of(proxy) == OK
    assert rcode_of(proxy, zone.MX_TARGET) == OK
    api(proxy, "POST", f"/api/runs/{run['run']}/stop", {})
    _, report = api(proxy, "GET", f"/api/reports/{run['run']}")
    assert report["dry_run"] and report["rules"][0]["matched"] == 3
    assert report["clients"][0]["faults"] == {"nxdomain": 3}
    assert list(report["names"]) == [zone.WWW.rstrip(".")]


def test_start_at_a_time(gameday):
    proxy = gameday(LONG)
    at = time.time() + 1.5
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at)) + f".{int(at % 1 * 1000):03d}Z"
    status, run = api(proxy, "POST", "/api/scenarios/long/start", {"at": stamp})
    assert status == 201 and run["state"] == "pending"
    assert rcode_of(proxy) == OK
    wait_rcode(proxy, NX)
    assert run_state(proxy, run["run"])["state"] == "running"


def test_cron_schedule_rejoins_and_new_files_are_watched(gameday):
    # "* * * * *" with a 2-minute run: some occurrence is always in progress, so
    # the proxy joins it at once, as a restarted proxy would.
    weekly = dict(LONG, name="every-minute", schedule="* * * * *", timezone="UTC",
                  phases=[dict(LONG["phases"][0], duration="2m")])
    proxy = gameday(weekly)
    wait_rcode(proxy, NX)
    _, status = api(proxy, "GET", "/api/status")
    (run,) = status["runs"]
    assert run["scenario"] == "every-minute" and run["trigger"] == "schedule"
    assert status["schedules"][0]["schedule"] == "* * * * *"
    api(proxy, "POST", "/api/reset", {})
    # An invalid file is refused and shown; a valid one appears without a restart.
    folder = proxy.tmp / "scenarios"
    (folder / "bad.yaml").write_text("name: bad\nphases: [{name: p, duration: soon}]\n")
    (folder / "new.yaml").write_text(json.dumps(dict(TWO_PHASES, name="new")))
    wait_until(lambda: "new" in {s["name"] for s in api(proxy, "GET", "/api/scenarios")[1]
                                 ["scenarios"]}, timeout=8, interval=0.2, what="new scenario")
    _, listing = api(proxy, "GET", "/api/scenarios")
    assert "phases[0].duration" in listing["errors"][str(folder / "bad.yaml")]


def test_sigterm_ends_runs_with_a_report(gameday):
    proxy = gameday(LONG)
    _, run = api(proxy, "POST", "/api/scenarios/long/start", {})
    assert proxy.stop() == 0
    report = json.loads((proxy.tmp / "reports" / f"{run['run']}.json").read_text())
    assert report["ended"] == "shutdown"
