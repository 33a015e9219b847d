"""The dependency map, its merge, preview, preflight and the recovery watch:
pure code, hand-moved clock, exact values."""

from __future__ import annotations

import sys

import dns.message
import dns.rcode
import dns.rrset

from proxy.affected import ClientGroups
from proxy.core.deps import DepMap, merge_rows
from proxy.core.model import Scenario
from proxy.core.preview import UpstreamHealth, preflight, preview, selects_nothing
from proxy.core.recovery import Recovery, faulted_pairs
from proxy.dependencies import client_view, name_view
from proxy.loader import load_model


def question(name: str, qtype: str = "A") -> bytes:
    wire = dns.message.make_query(name, qtype).to_wire()
    return wire[12:]  # no EDNS: the question is the rest


def reply(name: str, qtype: str = "A", rcode: int = 0, data: bool = True) -> bytes:
    query = dns.message.make_query(name, qtype)
    response = dns.message.make_response(query)
    response.set_rcode(rcode)
    if data and rcode == 0:
        response.answer.append(dns.rrset.from_text(name, 60, "IN", "A", "192.0.2.1"))
    return response.to_wire()


def feed(deps: DepMap, client: str, name: str, qtype: str = "A", times: int = 1,
         rcode: int = 0, data: bool = True) -> None:
    for _ in range(times):
        deps.answer(client, question(name, qtype), reply(name, qtype, rcode, data))


def known_map(now: float = 1000.0) -> DepMap:
    deps = DepMap()
    deps.tick(now)
    feed(deps, "10.0.0.1", "api.example.test.", times=3)
    feed(deps, "10.0.0.1", "API.Example.test.", times=1)  # 0x20: merged when read
    feed(deps, "10.0.0.1", "api.example.test.", "AAAA", times=2, data=False)
    feed(deps, "10.0.0.2", "db.example.test.", times=4)
    feed(deps, "10.0.0.2", "gone.example.test.", rcode=dns.rcode.NXDOMAIN)
    deps.tick(now + 10)
    feed(deps, "10.0.0.3", "db.example.test.", rcode=dns.rcode.SERVFAIL)
    deps.timeout("10.0.0.3", question("db.example.test."))
    return deps


def names_of(row: dict) -> dict:
    return {(n["name"], n["qtype"]): (n["queries"], {k: v for k, v in n["answers"].items() if v})
            for n in row["names"]}


def test_the_map_after_known_traffic():
    rows = known_map().rows()
    by = {c["client"]: c for c in rows["clients"]}
    assert sorted(by) == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    assert names_of(by["10.0.0.1"]) == {("api.example.test.", 1): (4, {"data": 4}),
                                        ("api.example.test.", 28): (2, {"nodata": 2})}
    assert names_of(by["10.0.0.2"]) == {("db.example.test.", 1): (4, {"data": 4}),
                                        ("gone.example.test.", 1): (1, {"nxdomain": 1})}
    assert names_of(by["10.0.0.3"]) == {("db.example.test.", 1): (2, {"servfail": 1,
                                                                      "timeout": 1})}
    assert by["10.0.0.3"]["first_seen"] == 1010.0
    assert by["10.0.0.1"]["last_seen"] == 1000.0
    db3 = by["10.0.0.3"]["names"][0]
    assert db3["last_good"] is None  # SERVFAIL and a timeout are not good answers
    assert rows["clients_overflow"] == 0


def test_caps_count_the_overflow():
    deps = DepMap(max_clients=2, max_names=1)
    feed(deps, "10.0.0.1", "a.test.")
    feed(deps, "10.0.0.1", "b.test.", times=2)
    feed(deps, "10.0.0.2", "a.test.")
    feed(deps, "10.0.0.3", "a.test.", times=3)
    rows = deps.rows()
    assert [(c["client"], c["names_overflow"], len(c["names"])) for c in rows["clients"]] == [
        ("10.0.0.1", 2, 1), ("10.0.0.2", 0, 1)]
    assert rows["clients_overflow"] == 3


def test_merge_rows_sums_workers():
    one, two = known_map(), DepMap()
    two.tick(900.0)
    feed(two, "10.0.0.1", "api.example.test.", times=5, rcode=dns.rcode.SERVFAIL)
    feed(two, "10.0.0.9", "x.test.")
    merged = merge_rows([one.rows(), two.rows()])
    by = {c["client"]: c for c in merged["clients"]}
    assert sorted(by) == ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.9"]
    assert names_of(by["10.0.0.1"])[("api.example.test.", 1)] == (9, {"data": 4, "servfail": 5})
    assert by["10.0.0.1"]["first_seen"] == 900.0
    assert by["10.0.0.1"]["last_seen"] == 1000.0


def test_client_view_groups_filters_and_turns_around():
    groups = ClientGroups({"10.0.0.0/31": "frontend"})  # .0 and .1
    view = client_view(known_map().rows(), groups, 2000.0)
    assert [(c["client"], c["addresses"], c["queries"]) for c in view["clients"]] == [
        ("frontend", ["10.0.0.1"], 6), ("10.0.0.2", ["10.0.0.2"], 5),
        ("10.0.0.3", ["10.0.0.3"], 2)]
    api = view["clients"][0]["names"][0]
    assert api["name"] == "api.example.test." and api["qtypes"] == {"A": 4, "AAAA": 2}
    only = client_view(known_map().rows(), groups, 2000.0, suffix="db.example.test")
    assert [c["client"] for c in only["clients"]] == ["10.0.0.2", "10.0.0.3"]
    assert [n["name"] for n in only["clients"][0]["names"]] == ["db.example.test."]
    recent = client_view(known_map().rows(), groups, 2000.0, since=1005.0)
    assert [c["client"] for c in recent["clients"]] == ["10.0.0.3"]
    one = client_view(known_map().rows(), groups, 2000.0, client="frontend")
    assert [c["client"] for c in one["clients"]] == ["frontend"]
    names = name_view(view)["names"]
    assert [(n["name"], n["queries"], n["clients"]) for n in names] == [
        ("api.example.test.", 6, [{"client": "frontend", "queries": 6}]),
        ("db.example.test.", 6, [{"client": "10.0.0.2", "queries": 4},
                                 {"client": "10.0.0.3", "queries": 2}]),
        ("gone.example.test.", 1, [{"client": "10.0.0.2", "queries": 1}])]


SCENARIO = """
name: db-outage
phases:
  - name: break
    duration: 10m
    rules:
      - name: db
        match: {name: db.example.test, probability: 0.5}
        fault: {type: servfail}
      - name: rest
        match: {suffix: example.test, qtype: A, clients: [10.0.0.0/30]}
        fault: {type: nxdomain}
      - name: dynamo
        match: {name: dynamodb.us-east-1.amazonaws.com}
        fault: {type: servfail}
      - name: ghosts
        match: {suffix: example.test, clients: [10.9.0.0/16]}
        fault: {type: nxdomain}
"""


def scenario() -> Scenario:
    return load_model(SCENARIO, "<test>", Scenario)


def test_preview_selects_like_the_engine_first_match_wins():
    result = preview(scenario(), known_map().rows(), now=1500.0, window=3600.0)
    rules = {r["name"]: r for r in result["phases"][0]["rules"]}
    db = rules["db"]
    assert [(c["client"], c["queries"], c["expected_faults"]) for c in db["clients"]] == [
        ("10.0.0.2", 4, 2.0), ("10.0.0.3", 2, 1.0)]
    assert db["expected_faults"] == 3.0
    rest = rules["rest"]
    # db.example.test: the half that `db` leaves; api A only (AAAA not selected);
    # 10.0.0.3 is in 10.0.0.0/30 too.
    got = {c["client"]: {n["name"]: (n["queries"], n["expected_faults"]) for n in c["names"]}
           for c in rest["clients"]}
    assert got == {"10.0.0.1": {"api.example.test.": (4, 4.0)},
                   "10.0.0.2": {"db.example.test.": (4, 2.0), "gone.example.test.": (1, 1.0)},
                   "10.0.0.3": {"db.example.test.": (2, 1.0)}}
    assert rest["expected_faults"] == 8.0
    assert rules["dynamo"]["clients"] == [] and rules["ghosts"]["clients"] == []
    assert selects_nothing(result) == ["break/dynamo", "break/ghosts"]


def test_preview_window_leaves_out_old_entries():
    result = preview(scenario(), known_map().rows(), now=1000.0 + 3600 + 5, window=3600.0)
    rules = {r["name"]: r for r in result["phases"][0]["rules"]}
    assert [c["client"] for c in rules["db"]["clients"]] == ["10.0.0.3"]
    assert [c["client"] for c in rules["rest"]["clients"]] == ["10.0.0.3"]


def test_preflight_warns_for_a_name_nobody_asked_for():
    rows = known_map().rows()
    result = preview(scenario(), rows, now=1500.0, window=3600.0)
    checked = preflight(scenario(), result, rows, [UpstreamHealth("127.0.0.1:53", True, False),
                                                   UpstreamHealth("127.0.0.2:53", False, False),
                                                   UpstreamHealth("127.0.0.3:53", True, True)])
    assert checked["ok"] is False
    assert [(w["kind"], w["rule"]) for w in checked["warnings"]] == [
        ("no_traffic", "break/dynamo"), ("no_traffic", "break/ghosts"),
        ("unseen_client", "break/ghosts"), ("upstream_unhealthy", None), ("loop", None)]
    assert checked["warnings"][0]["message"] == (
        "no client asked for dynamodb.us-east-1.amazonaws.com in the last hour: are clients "
        "pointed at the proxy? node-local caches, hostNetwork pods and application caches "
        "bypass it")
    fine = load_model("name: ok\nphases: [{name: p, duration: 1m, rules: [{match: {name: "
                      "db.example.test}, fault: {type: servfail}}]}]", "<t>", Scenario)
    clean = preflight(fine, preview(fine, rows, 1500.0, 3600.0), rows,
                      [UpstreamHealth("127.0.0.1:53", True, False)])
    assert clean == {"ok": True, "warnings": []}


def test_recovery_one_back_one_failing_one_silent():
    deps = DepMap()
    deps.tick(100.0)
    for client in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):
        feed(deps, client, "db.example.test.")  # before the run
    clients = [
        {"run": "r", "client": c, "dry_run": False, "faulted": {"db.example.test": 3}}
        for c in ("10.0.0.1", "10.0.0.2", "10.0.0.3")]
    clients.append({"run": "r", "client": "10.0.0.4", "dry_run": False,
                    "faulted": {}})  # selected, never faulted (a flap that was off)
    pairs = faulted_pairs(clients)
    assert pairs == [(c, "db.example.test.") for c in ("10.0.0.1", "10.0.0.2", "10.0.0.3")]
    watch = Recovery.start(pairs, deps.rows(), ended_at=200.0, window=60.0)
    assert watch.unrecovered() == 3
    deps.tick(202.5)
    feed(deps, "10.0.0.1", "db.example.test.")
    feed(deps, "10.0.0.2", "db.example.test.", rcode=dns.rcode.SERVFAIL)
    watch.update(deps.rows(), 203.0)
    assert [(e["client"], e["status"], e["after"]) for e in watch.summary()["entries"]] == [
        ("10.0.0.1", "recovered", 2.5), ("10.0.0.2", "failing", None),
        ("10.0.0.3", "watching", None)]
    assert watch.unrecovered() == 2 and watch.closed is False
    deps.tick(230.0)
    deps.timeout("10.0.0.2", question("db.example.test."))
    watch.update(deps.rows(), 259.9)
    assert watch.closed is False
    watch.update(deps.rows(), 260.0)
    summary = watch.summary()
    assert summary["closed"] is True and summary["window"] == 60.0
    assert [(e["client"], e["status"], e["after"]) for e in summary["entries"]] == [
        ("10.0.0.1", "recovered", 2.5), ("10.0.0.2", "failing", None),
        ("10.0.0.3", "unseen", None)]
    deps.tick(300.0)
    feed(deps, "10.0.0.3", "db.example.test.")
    watch.update(deps.rows(), 300.0)  # closed: nothing changes any more
    assert watch.summary() == summary


def test_a_failing_client_that_comes_back_recovers():
    deps = DepMap()
    watch = Recovery.start([("10.0.0.2", "db.example.test.")], deps.rows(), 0.0, 600.0)
    deps.tick(1.0)
    feed(deps, "10.0.0.2", "db.example.test.", rcode=dns.rcode.SERVFAIL)
    watch.update(deps.rows(), 1.0)
    assert watch.summary()["entries"][0]["status"] == "failing"
    deps.tick(7.0)
    feed(deps, "10.0.0.2", "db.example.test.")
    watch.update(deps.rows(), 7.0)
    assert watch.summary()["entries"][0] == {"client": "10.0.0.2", "name": "db.example.test.",
                                             "status": "recovered", "after": 7.0}


def test_memory_per_entry_is_bounded():
    """The figure docs/gameday.md gives: bytes per (client, question) entry,
    counted object by object (the entry's list, its key, its share of the
    dict's table); tracemalloc undercounts objects reused from free lists."""
    deps = DepMap(max_names=5000)
    answer = reply("x.test.")
    for i in range(2000):
        wire = dns.message.make_query(f"name{i}.service{i % 7}.example.test.", "A").to_wire()
        deps.answer("10.0.0.1", wire[12:], answer)  # the key is a slice, as the forwarder's
    names = deps.clients["10.0.0.1"]
    per_entry = (sum(sys.getsizeof(k) + sys.getsizeof(v) for k, v in names.items())
                 + sys.getsizeof(names)) / len(names)
    print(f"{per_entry:.0f} bytes per entry")
    assert len(names) == 2000
    assert 200 <= per_entry <= 300


def test_game_day_watches_recovery_after_a_run():
    """The manager: a run ends, its faulted clients are watched in the map,
    the report's recovery section follows, dry runs and fault-less runs are
    not watched."""
    import random

    from proxy.core.engine import Engine
    from proxy.core.query import QueryView
    from proxy.gameday import views
    from proxy.gameday.runs import GameDay

    now = [1000.0]
    deps = DepMap()
    engine = Engine()
    gd = GameDay(engine, clock=lambda: now[0], deps=deps.rows, recovery_window=30.0)
    gd.add_scenario(Scenario.model_validate({"name": "s", "phases": [
        {"name": "p", "duration": 10, "rules": [
            {"name": "db", "match": {"name": "db.internal"}, "fault": "nxdomain"}]}]}))
    run = gd.start("s")
    rng = random.Random(1)
    for client in ("10.0.0.1", "10.0.0.2"):
        wire = dns.message.make_query("db.internal.", "A").to_wire()
        assert engine.on_query(QueryView.parse(wire, client, "udp"), 1001.0, rng) is not None
    other = dns.message.make_query("www.internal.", "A").to_wire()
    assert engine.on_query(QueryView.parse(other, "10.0.0.3", "udp"), 1001.0, rng) is None
    now[0] = 1010.5
    gd.tick()  # the run completed at 1010
    row = views.run_row(gd, run.id)
    assert row["recovery"] == {"window": 30.0, "closed": False, "entries": [
        {"client": "10.0.0.1", "name": "db.internal.", "status": "watching", "after": None},
        {"client": "10.0.0.2", "name": "db.internal.", "status": "watching", "after": None}]}
    assert gd.unrecovered() == [(run.id, "s", 2)]
    deps.tick(1013.0)
    feed(deps, "10.0.0.1", "db.internal.")
    now[0] = 1013.1
    gd.tick()
    assert [(e["status"], e["after"]) for e in gd.report(run.id)["recovery"]["entries"]] == [
        ("recovered", 3.0), ("watching", None)]
    now[0] = 1040.0
    gd.tick()
    assert gd.report(run.id)["recovery"]["closed"] is True
    assert [e["status"] for e in gd.report(run.id)["recovery"]["entries"]] == [
        "recovered", "unseen"]
    assert gd.unrecovered() == [(run.id, "s", 1)]  # kept as long as the run's other series
    now[0] = 1010.0 + 600.0  # ended_run_retention
    gd.tick()
    assert gd.unrecovered() == []
    dry = gd.start("s", dry_run=True)
    assert views.run_row(gd, dry.id)["recovery"] is None
    gd.stop(dry.id)
    assert "recovery" not in gd.report(dry.id)
