"""Several runs in the engine, and the runs manager, on a clock moved by hand."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import dns.message
import dns.rcode
import pytest
from dnslib import DNSRecord

from proxy.core.engine import Engine
from proxy.core.model import Rule, Scenario
from proxy.core.query import QueryView
from proxy.core.schedule import parse_time
from proxy.core.verdict import Reply
from proxy.gameday import views
from proxy.gameday.catalog import Catalog
from proxy.gameday.records import NotFound, Refused
from proxy.gameday.runs import GameDay

NX, SERVFAIL, REFUSED = dns.rcode.NXDOMAIN, dns.rcode.SERVFAIL, dns.rcode.REFUSED
RNG = random.Random(1)


def q(name: str = "db.internal", client: str = "10.0.0.1", qtype: str = "A") -> QueryView:
    return QueryView.parse(bytes(DNSRecord.question(name, qtype).pack()), client, "udp", "")


def rcode(verdict: Any) -> int | None:
    return dns.message.from_wire(verdict.wire).rcode() if isinstance(verdict, Reply) else None


def scenario(name: str = "s", *phases: tuple[str, float, str], **extra: Any) -> Scenario:
    phases = phases or (("one", 10, "nxdomain"), ("two", 10, "servfail"))
    return Scenario.model_validate({"name": name, **extra, "phases": [
        {"name": p, "duration": d, "rules": [{"name": f"r-{p}", "match": {"suffix": "internal"},
                                              "fault": f}]} for p, d, f in phases]})


def rule(fault: str = "refused", **match: Any) -> Rule:
    return Rule.model_validate({"match": match or {"suffix": "internal"}, "fault": fault})


# --- the engine with several runs ---------------------------------------------------------


def test_order_adhoc_first_then_runs_by_start_time() -> None:
    engine = Engine()
    engine.add_run("late", scenario("late", ("p", 100, "servfail")), 50.0, 60.0)
    engine.add_run("early", scenario("early", ("p", 100, "nxdomain")), 40.0, 60.0)
    assert rcode(engine.on_query(q(), 60.0, RNG)) == NX  # the earlier run wins
    engine.add_rule("rule:x", rule("refused"), 60.0, 70.0)
    assert rcode(engine.on_query(q(), 61.0, RNG)) == REFUSED  # ad hoc rules come first
    assert engine.on_query(q("www.example.com"), 61.0, RNG) is None  # not selected
    assert rcode(engine.on_query(q(), 70.0, RNG)) == NX  # the ad hoc rule expired
    assert [(r["run"], r["state"]) for r in engine.runs_info(70.0)] == [
        ("rule:x", "ended"), ("early", "running"), ("late", "running")]
    assert engine.tick(70.0) == [("rule:x", "expired")]
    assert engine.tick(70.0) == []  # each ended run is returned once


def test_stop_one_run_leaves_the_others() -> None:
    engine = Engine()
    engine.add_run("a", scenario("a", ("p", 100, "nxdomain")), 0.0, 0.0)
    engine.add_run("b", scenario("b", ("p", 100, "servfail")), 1.0, 1.0)
    assert engine.stop_run("a", 5.0)
    assert not engine.stop_run("a", 6.0)  # a second stop is harmless
    assert rcode(engine.on_query(q(), 7.0, RNG)) == SERVFAIL
    engine.reset(8.0)
    assert not engine.active and engine.on_query(q(), 8.0, RNG) is None
    assert {r["run"]: r["state"] for r in engine.runs_info(8.0)} == {"a": "ended", "b": "ended"}
    assert engine.stats("a")[0]["matched"] == 0 and engine.stats("b")[0]["matched"] == 1
    engine.forget("a")
    assert [r["run"] for r in engine.stats()] == ["b"]


def test_hard_end_wins_over_phases_and_ignores_pauses() -> None:
    engine = Engine()
    engine.add_run("r", scenario(), 0.0, 0.0, max_duration=15.0)
    assert rcode(engine.on_query(q(), 12.0, RNG)) == SERVFAIL
    assert engine.on_query(q(), 15.0, RNG) is None and not engine.active
    assert engine.tick(15.0) == [("r", "max_duration")]
    engine.add_run("p", scenario("p"), 100.0, 100.0, max_duration=15.0)
    engine.pause("p", 101.0)
    engine.resume("p", 110.0)
    assert engine.on_query(q(), 115.0, RNG) is None  # wall time counts, paused or not
    assert engine.tick(115.0) == [("p", "max_duration")]


def test_a_run_that_completes_says_so() -> None:
    engine = Engine()
    engine.add_run("r", scenario(), 0.0, 0.0, max_duration=20.0)
    assert engine.tick(20.0) == [("r", "completed")]


def test_pause_freezes_the_run_timeline() -> None:
    engine = Engine()
    engine.add_run("r", scenario(), 0.0, 0.0)
    assert engine.pause("r", 5.0) and not engine.pause("r", 6.0)
    assert not engine.active and engine.on_query(q(), 6.0, RNG) is None
    info = engine.runs_info(50.0)[0]
    assert (info["state"], info["phase"], info["remaining"]) == ("paused", "one", 5.0)
    assert engine.resume("r", 100.0) and not engine.resume("r", 100.0)
    # Run time 5 at wall 100: phase one still has 5 s, then phase two.
    assert rcode(engine.on_query(q(), 104.9, RNG)) == NX
    assert rcode(engine.on_query(q(), 105.0, RNG)) == SERVFAIL
    assert engine.tick(115.0) == [("r", "completed")]


def test_pending_run_starts_at_its_time() -> None:
    engine = Engine()
    engine.add_run("r", scenario(), 100.0, 0.0)
    assert engine.active  # waiting: it must see the clock reach its start
    assert engine.runs_info(50.0)[0]["state"] == "pending"
    assert engine.on_query(q(), 99.0, RNG) is None
    assert rcode(engine.on_query(q(), 100.0, RNG)) == NX


def test_dry_run_counts_but_changes_nothing() -> None:
    engine = Engine()
    engine.add_run("dry", scenario("dry", ("p", 100, "nxdomain")), 0.0, 0.0, dry_run=True)
    assert engine.active
    for client in ("10.0.0.1", "10.0.0.2", "10.0.0.1"):
        assert engine.on_query(q(client=client), 1.0, RNG) is None
    assert engine.on_query(q("www.example.com"), 1.0, RNG) is None
    (row,) = engine.stats()
    assert (row["dry_run"], row["matched"], row["injected"]) == (True, 3, 3)
    clients = {c["client"]: c for c in engine.client_stats()}
    assert set(clients) == {"10.0.0.1", "10.0.0.2"}
    assert clients["10.0.0.1"]["faults"] == {"nxdomain": 2}
    assert clients["10.0.0.1"]["names"] == {"db.internal": 2}
    # A dry run never shadows a real run's rule.
    engine.add_run("real", scenario("real", ("p", 100, "servfail")), 0.5, 1.0)
    assert rcode(engine.on_query(q(), 2.0, RNG)) == SERVFAIL
    assert engine.stats("dry")[0]["matched"] == 4


def test_client_stats_are_bounded() -> None:
    engine = Engine(client_cap=2)
    engine.add_rule("rule:x", rule("nxdomain"), 0.0)
    for i in range(5):
        engine.on_query(q(client=f"10.0.0.{i}"), float(i), RNG)
    for i in range(120):
        engine.on_query(q(f"n{i}.internal", client="10.0.0.0"), 10.0, RNG)
    rows = {c["client"]: c for c in engine.client_stats()}
    assert set(rows) == {"10.0.0.0", "10.0.0.1", "other"}
    assert rows["other"]["faults"] == {"nxdomain": 3}
    assert (rows["other"]["first_seen"], rows["other"]["last_seen"]) == (2.0, 4.0)
    names = rows["10.0.0.0"]["names"]
    assert len(names) == 101 and names["other"] == 21
    assert len(rows["10.0.0.0"]["faulted"]) == 101  # the same cap for the faulted names
    assert set(rows["10.0.0.0"]) == {"run", "scenario", "phase", "rule", "client", "dry_run",
                                     "first_seen", "last_seen", "faults", "names", "faulted"}


def test_names_asked_and_names_faulted_apart() -> None:
    """A flap: every query is selected (names), only those in its on time get
    the fault (faulted)."""
    engine = Engine()
    flap = Rule.model_validate({"match": {"suffix": "internal"}, "fault": {
        "type": "flap", "period": 10, "duty": 0.5, "fault": "nxdomain"}})
    engine.add_rule("rule:f", flap, 0.0)
    assert rcode(engine.on_query(q("on.internal"), 1.0, RNG)) == NX  # on for 0-5 s
    assert engine.on_query(q("off.internal"), 6.0, RNG) is None  # off for 5-10 s
    assert rcode(engine.on_query(q("on.internal"), 11.0, RNG)) == NX
    (row,) = engine.client_stats()
    assert row["names"] == {"on.internal": 2, "off.internal": 1}
    assert row["faulted"] == {"on.internal": 2}


def test_a_delayed_verdict_names_its_run() -> None:
    """The transport files a query held in a delay under the run whose rule
    gave the verdict; verdicts without a delay need no run."""
    engine = Engine()
    slow = {"type": "delay", "delay": "3s", "then": "servfail"}
    engine.add_run("a", Scenario.model_validate({"name": "a", "phases": [
        {"name": "p", "duration": 100, "rules": [
            {"match": {"name": "a.internal"}, "fault": slow},
            {"match": {"name": "b.internal"}, "fault": {"type": "delay", "delay": "2s"}},
            {"match": {"name": "c.internal"}, "fault": {
                "type": "delay", "delay": "1s", "then": {"type": "drop", "tcp": "close"}}},
            {"match": {"name": "d.internal"}, "fault": "nxdomain"}]}]}), 0.0, 0.0)
    engine.add_rule("rule:x", rule(slow, name="x.internal"), 0.0)
    verdicts = {name: engine.on_query(q(f"{name}.internal"), 1.0, RNG)
                for name in ("a", "b", "c", "d", "x")}
    assert {name: (type(v).__name__, v.delay, v.run) for name, v in verdicts.items()} == {
        "a": ("Reply", 3.0, "a"), "b": ("Forward", 2.0, "a"), "c": ("Drop", 1.0, "a"),
        "d": ("Reply", 0.0, None), "x": ("Reply", 3.0, "rule:x")}
    assert rcode(verdicts["a"]) == SERVFAIL  # the fault itself is unchanged


def test_exact_stats_and_runs_info_keys() -> None:
    engine = Engine()
    engine.add_run("r", scenario(), 0.0, 0.0)
    assert set(engine.stats()[0]) == {"run", "scenario", "phase", "phase_index", "rule", "fault",
                                      "dry_run", "matched", "injected", "errors"}
    assert engine.runs_info(3.0) == [{"run": "r", "scenario": "s", "state": "running",
                                      "dry_run": False, "phase": "one", "phase_index": 0,
                                      "remaining": 7.0}]


# --- the runs manager ---------------------------------------------------------------------


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def manager(clock: Clock, **kw: Any) -> tuple[GameDay, Engine, list[str | None]]:
    """A manager whose `release` records the run id it is asked to release."""
    engine = Engine()
    released: list[str | None] = []
    gd = GameDay(engine, clock=clock, release=lambda run=None: released.append(run) or 0, **kw)
    return gd, engine, released


def test_manager_start_stop_and_report() -> None:
    clock = Clock(1000.0)
    gd, engine, released = manager(clock)
    gd.add_scenario(scenario())
    run = gd.start("s", who="alice")
    assert rcode(engine.on_query(q(), 1001.0, RNG)) == NX
    clock.now = 1012.0
    gd.tick()
    assert rcode(engine.on_query(q(client="10.9.9.9"), 1012.0, RNG)) == SERVFAIL
    assert gd.stop(run.id) == [run.id]
    assert released == [run.id]  # the queries it holds in a delay are let go
    assert engine.on_query(q(), 1012.1, RNG) is None and not engine.active
    assert gd.stop(run.id) == [] and gd.stop("s") == []  # a second stop is harmless
    report = gd.report(run.id)
    assert report["ended"] == "stopped" and report["started_by"] == "alice"
    assert [p["phase"] for p in report["timeline"]] == ["one", "two"]
    assert report["timeline"][1]["started_at"] == "1970-01-01T00:16:50.000Z"  # 1010: exact
    assert {c["client"] for c in report["clients"]} == {"10.0.0.1", "10.9.9.9"}
    with pytest.raises(NotFound):
        gd.stop("nosuch")


def test_manager_max_duration_reverts_and_is_capped() -> None:
    clock = Clock(0.0)
    gd, engine, _ = manager(clock, max_run_duration=30.0)
    gd.add_scenario(scenario("long", ("p", 3600, "nxdomain")))
    run = gd.start("long")
    assert run.max_duration == 30.0  # the global cap
    run2 = gd.start("long", max_duration=5.0)
    assert run2.max_duration == 5.0
    clock.now = 5.0
    gd.tick()
    assert gd.report(run2.id)["ended"] == "max_duration"
    clock.now = 30.0
    gd.tick()
    assert gd.runs == {} and not engine.active
    assert "30.0s" in gd.report(run.id)["ended_because"]


def test_manager_at_time_and_dry_run() -> None:
    clock = Clock(parse_time("2026-12-01T13:00Z"))
    gd, engine, _ = manager(clock)
    gd.add_scenario(scenario())
    run = gd.start("s", at=parse_time("2026-12-01T14:00Z"), dry_run=True)
    assert views.run_rows(gd)[0]["state"] == "pending"
    assert run.id == "s-20261201T140000Z"
    clock.now = parse_time("2026-12-01T14:00:01Z")
    assert engine.on_query(q(), clock.now, RNG) is None  # dry: nothing changes
    gd.stop(run.id)
    report = gd.report(run.id)
    assert report["dry_run"] and report["totals"]["matched"] == 1
    with pytest.raises(ValueError, match="already be over"):
        gd.start("s", at=clock.now - 3600)


def test_manager_schedule_fires_and_rejoins() -> None:
    clock = Clock(parse_time("2026-12-01T14:15Z"))  # a restart, 15 min into the run
    gd, engine, _ = manager(clock)
    gd.add_scenario(scenario("weekly", ("a", 600, "nxdomain"), ("b", 1200, "servfail"),
                             schedule="0 14 * * TUE", timezone="UTC"))
    gd.tick()
    (run,) = gd.runs.values()
    assert run.trigger == "schedule" and run.started_at == parse_time("2026-12-01T14:00Z")
    assert rcode(engine.on_query(q(), clock.now, RNG)) == SERVFAIL  # phase b, as scheduled
    gd.tick()
    assert len(gd.runs) == 1  # not started twice
    clock.now = parse_time("2026-12-01T14:30Z")
    gd.tick()
    assert gd.runs == {} and gd.report(run.id)["ended"] == "completed"
    # Not scheduled: a restart does not resume anything.
    gd2, engine2, _ = manager(clock)
    gd2.add_scenario(scenario())
    gd2.tick()
    assert gd2.runs == {} and not engine2.active


def test_manager_releases_only_what_the_ended_run_holds() -> None:
    """Stopping or pausing a run, removing or expiring an ad hoc rule, asks
    the forwarder to release the queries of that run (each ad hoc rule is an
    engine run of its own) and no other; reset releases everything."""
    clock = Clock(0.0)
    gd, engine, released = manager(clock)
    gd.add_scenario(scenario("a", ("p", 100, "nxdomain")))
    gd.add_scenario(scenario("b", ("p", 100, "servfail")))
    a, b = gd.start("a"), gd.start("b")
    gd.add_rule("kept", rule("refused", name="kept.internal"), duration=300.0)
    gd.add_rule("gone", rule("refused", name="gone.internal"), duration=300.0)
    gd.add_rule("short", rule("refused", name="short.internal"), duration=2.0)
    assert released == []  # starting releases nothing
    assert gd.pause(b.id) == [b.id]
    assert gd.stop(a.id) == [a.id]
    assert gd.remove_rule("gone")
    clock.now = 2.0
    gd.tick()
    assert released == [b.id, a.id, "rule:gone", "rule:short"]
    assert set(gd.rules) == {"kept"}
    assert {r["run"] for r in engine.runs_info(2.0)} == {b.id, "rule:kept"}
    gd.resume(b.id)
    assert released[4:] == []  # resuming holds nothing new
    assert gd.reset() == {"runs": [b.id], "rules": ["kept"]}
    assert released[4:] == [b.id, None]  # b's own, then every held query


def test_manager_pause_resume_reset_and_rules() -> None:
    clock = Clock(0.0)
    gd, engine, released = manager(clock)
    gd.add_scenario(scenario())
    run = gd.start("s")
    clock.now = 5.0
    assert gd.pause("s") == [run.id] and gd.pause("s") == []
    assert views.run_rows(gd)[0]["state"] == "paused"
    clock.now = 12.0  # the hard limit (20 s of wall time) keeps counting while paused
    assert gd.resume(run.id) == [run.id]
    row = views.run_rows(gd)[0]
    assert (row["phase"], row["remaining"], row["time_left"]) == ("one", 5.0, 8.0)
    gd.add_rule("db", rule("refused", name="db.internal"), duration=300.0)
    assert rcode(engine.on_query(q(), 12.0, RNG)) == REFUSED
    assert views.rule_rows(gd)[0]["matched"] == 1
    out = gd.reset()
    assert out == {"runs": [run.id], "rules": ["db"]}
    assert not engine.active and engine.on_query(q(), 12.0, RNG) is None
    assert gd.report(run.id)["ended"] == "reset"


def test_manager_rule_expires() -> None:
    clock = Clock(0.0)
    gd, engine, _ = manager(clock)
    gd.add_rule("db", rule("nxdomain"), duration=300.0)
    clock.now = 300.0
    gd.tick()
    assert gd.rules == {} and not engine.active


async def test_probe_aborts_the_run() -> None:
    results = iter([(True, "HTTP 200"), (False, "HTTP 503"), (False, "HTTP 503")])

    async def checker(probe: Any) -> tuple[bool, str]:
        return next(results, (False, "HTTP 503"))

    gd, engine, _ = manager(Clock(0.0), checker=checker)
    gd.clock = lambda: asyncio.get_running_loop().time()
    gd.add_scenario(scenario("p", ("x", 3600, "nxdomain"), probes=[
        {"name": "api", "http": "http://127.0.0.1:1/health", "interval": 0.01, "failures": 2}]))
    run = gd.start("p")
    for _ in range(200):
        await asyncio.sleep(0.01)
        if not gd.runs:
            break
    assert gd.runs == {} and not engine.active
    report = gd.report(run.id)
    assert report["ended"] == "aborted"
    assert "probe api failed 2 time(s) in a row: HTTP 503" in report["ended_because"]
    (probe,) = report["probes"]
    assert (probe["checks"], probe["failed"]) == (3, 2)
    await gd.close()


def test_catalog_refuses_an_invalid_edit(tmp_path: Path) -> None:
    good = "name: a\nphases: [{name: p, duration: 1m}]\n"
    (tmp_path / "a.yaml").write_text(good)
    gd, _, _ = manager(Clock(0.0), catalog=Catalog(str(tmp_path)))
    assert gd.reload().changed == ["a"]
    (tmp_path / "a.yaml").write_text(good.replace("1m", "soon"))
    changes = gd.reload()
    assert gd.catalog.get("a") is not None  # the running set is kept
    assert "phases[0].duration" in changes.errors[str(tmp_path / "a.yaml")]
    (tmp_path / "b.yml").write_text(good.replace("name: a", "name: b") +
                                    "schedule: '0 14 * * TUE'\ntimezone: UTC\n")
    gd.reload()
    assert set(gd.catalog.scenarios) == {"a", "b"} and set(gd.scheduler.entries) == {"b"}
    (tmp_path / "b.yml").unlink()
    assert gd.reload().removed == ["b"] and gd.scheduler.entries == {}


GOOD = ("name: a\nphases: [{name: p, duration: 1h, "
        "rules: [{match: {suffix: internal}, fault: nxdomain}]}]\n")


def test_a_scenario_whose_newest_file_was_refused_is_not_started(tmp_path: Path) -> None:
    file = tmp_path / "a.yaml"
    file.write_text(GOOD)
    gd, engine, _ = manager(Clock(0.0), catalog=Catalog(str(tmp_path)))
    gd.reload()
    assert gd.catalog.stale("a") is None
    gd.stop(gd.start("a").id)  # the valid version starts
    file.write_text(GOOD.replace("1h", "soon"))
    gd.reload()
    assert gd.catalog.get("a") is not None and gd.catalog.stale("a") == str(file)
    with pytest.raises(Refused) as info:
        gd.start("a")
    assert info.value.file == str(file)
    ((line, field),) = [(p.line, p.path) for p in info.value.problems]
    assert (line, field) == (2, "phases[0].duration")
    assert f"{file}:2: phases[0].duration: invalid duration 'soon'" in str(info.value)
    assert gd.runs == {} and not engine.active
    file.write_text(GOOD)  # fixed: it starts again
    gd.reload()
    assert gd.catalog.stale("a") is None and gd.start("a").scenario.name == "a"


def test_a_schedule_whose_newest_file_was_refused_is_skipped(tmp_path: Path, caplog) -> None:
    weekly = GOOD + "schedule: '0 14 * * TUE'\ntimezone: UTC\n"
    file = tmp_path / "a.yaml"
    file.write_text(weekly)
    clock = Clock(parse_time("2026-12-01T13:59Z"))
    gd, engine, _ = manager(clock, catalog=Catalog(str(tmp_path)))
    gd.reload()
    file.write_text(weekly.replace("1h", "soon"))
    gd.reload()
    clock.now = parse_time("2026-12-01T14:00:30Z")
    with caplog.at_level("ERROR", logger="dnschaos.gameday"):
        gd.tick()
    assert gd.runs == {} and not engine.active
    assert "schedule of a due at 2026-12-01T14:00:00.000Z skipped" in caplog.text
    assert "phases[0].duration" in caplog.text
    (skip,) = views.status(gd)["skipped_starts"]
    assert (skip["scenario"], skip["file"]) == ("a", str(file))
    # The next occurrence, after the file is fixed, runs.
    file.write_text(weekly)
    gd.reload()
    clock.now = parse_time("2026-12-08T14:00:30Z")
    gd.tick()
    (run,) = gd.runs.values()
    assert run.trigger == "schedule" and len(views.status(gd)["skipped_starts"]) == 1


def test_a_run_cut_by_max_run_duration_says_so() -> None:
    clock = Clock(0.0)
    gd, _, _ = manager(clock, max_run_duration=4 * 3600.0)
    gd.add_scenario(scenario("day", ("p", 24 * 3600, "nxdomain")))
    gd.add_scenario(scenario("short", ("p", 3600, "nxdomain")))
    run = gd.start("day")
    assert run.max_duration == 4 * 3600 and run.warnings == [
        "scenario day asks for 24h but max_run_duration is 4h: it stops after 4h"]
    row = views.run_row(gd, run.id)
    assert row["warnings"] == run.warnings and row["max_duration"] == 4 * 3600
    assert row["hard_end"] == "1970-01-01T04:00:00.000Z"
    asked = gd.start("short", max_duration=5 * 3600.0)  # the request's limit counts
    assert asked.warnings == [
        "scenario short asks for 5h but max_run_duration is 4h: it stops after 4h"]
    assert gd.start("short").warnings == []  # not cut: no warning


def test_an_adhoc_rule_cut_by_max_run_duration_says_so() -> None:
    gd, _, _ = manager(Clock(0.0), max_run_duration=4 * 3600.0)
    long = gd.add_rule("long", rule(), duration=10 * 3600.0)
    assert long.expires_at == 4 * 3600 and long.warnings == [
        "rule long asks for 10h but max_run_duration is 4h: it stops after 4h"]
    assert gd.add_rule("short", rule(), duration=300.0).warnings == []
    assert gd.add_rule("capped", rule(), duration=None).warnings == []  # asked for no length
    rows = {r["name"]: r for r in views.rule_rows(gd)}
    assert rows["long"]["warnings"] == long.warnings and rows["long"]["duration"] == 4 * 3600
    assert rows["short"]["warnings"] == [] and rows["short"]["duration"] == 300
