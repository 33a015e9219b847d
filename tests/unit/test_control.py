"""The control plane's pure parts: operations prepared on one game day and
applied on others (same state, whatever the order of arrival or a replay
later), the merge of several instances' counts, the Redis URL."""

from __future__ import annotations

import random
from typing import Any

import dns.message
import dns.rcode
import pytest
from dnslib import DNSRecord

from proxy.config import Settings
from proxy.control.counts import merge_instances, merge_rule_rows
from proxy.control.ops import Op, apply, prepare
from proxy.control.url import check_control_url, redact
from proxy.core.engine import Engine
from proxy.core.model import Rule, Scenario
from proxy.core.query import QueryView
from proxy.core.verdict import Reply
from proxy.gameday import views
from proxy.gameday.records import Conflict, NotFound
from proxy.gameday.runs import GameDay

NX, SERVFAIL = dns.rcode.NXDOMAIN, dns.rcode.SERVFAIL
RNG = random.Random(1)
SCENARIO = Scenario.model_validate({"name": "s", "seed": 42, "phases": [
    {"name": "one", "duration": 10, "rules": [{"name": "r1", "match": {"suffix": "internal"},
                                               "fault": "nxdomain"}]},
    {"name": "two", "duration": 10, "rules": [{"name": "r2", "match": {
        "suffix": "internal", "probability": 0.5}, "fault": "servfail"}]}]})


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def gameday(now: float = 1000.0) -> tuple[GameDay, Clock]:
    clock = Clock(now)
    gd = GameDay(Engine(), clock=clock)
    gd.add_scenario(SCENARIO)
    return gd, clock


def rcode(gd: GameDay, now: float) -> int | None:
    query = QueryView.parse(bytes(DNSRecord.question("db.internal", "A").pack()), "10.0.0.1",
                            "udp", "")
    verdict = gd.engine.on_query(query, now, RNG)
    return dns.message.from_wire(verdict.wire).rcode() if isinstance(verdict, Reply) else None


def wire(op: Op) -> Op:
    """Through the stream's fields and back, as every instance reads it."""
    return Op.from_fields(op.fields())


def test_a_start_applied_elsewhere_gives_the_same_run_and_phases() -> None:
    here, _ = gameday()
    there, there_clock = gameday()
    there_clock.now = 1000.3  # read a moment later: the entry's time counts, not this
    op = wire(prepare(here, "start", {"scenario": "s", "who": "alice"}, 1000.0, "p1"))
    assert op.by == "p1" and op.args["scenario"]["seed"] == 42
    ids = [apply(gd, op, set()) for gd in (here, there)]
    assert ids[0] == ids[1] == "s-19700101T001640Z"
    for gd in (here, there):
        record = gd.runs[ids[0]]
        assert (record.started_at, record.added_at, record.who) == (1000.0, 1000.0, "alice")
        assert rcode(gd, 1005.0) == NX
        assert rcode(gd, 1021.0) is None  # over after its two phases
    assert here.engine.get_run(ids[0]).rng.random() == there.engine.get_run(ids[0]).rng.random()


def test_pause_and_resume_happen_at_the_entry_time_everywhere() -> None:
    fleet = [gameday()[0] for _ in range(2)]
    start = prepare(fleet[0], "start", {"scenario": "s"}, 1000.0)
    run = [apply(gd, start, set()) for gd in fleet][0]
    pause = prepare(fleet[0], "pause", {"ref": run}, 1004.0)
    resume = prepare(fleet[0], "resume", {"ref": run}, 1014.0)
    for gd in fleet:
        assert apply(gd, pause, set()) == [run]
        assert rcode(gd, 1010.0) is None  # paused: no fault
        assert apply(gd, resume, set()) == [run]
        assert rcode(gd, 1019.0) == NX  # 10 s paused: still in phase one (run time 9 s)
        assert rcode(gd, 1021.0) in (SERVFAIL, None)  # phase two, sampled at 50 %
    assert fleet[0].engine.runs_info(1019.0) == fleet[1].engine.runs_info(1019.0)


def test_a_replay_later_reaches_the_state_of_the_live_instance() -> None:
    live, live_clock = gameday()
    late, late_clock = gameday()
    entries = [prepare(live, "start", {"scenario": "s"}, 1000.0)]
    run = apply(live, entries[0], set())
    entries.append(prepare(live, "pause", {"ref": run}, 1002.0))
    apply(live, entries[1], set())
    entries.append(prepare(live, "resume", {"ref": run}, 1005.0))
    apply(live, entries[2], set())
    live_clock.now = late_clock.now = 1016.0  # joins later, in phase two
    for entry in entries:
        apply(late, wire(entry), set(), catch_up=True)
    assert views.run_row(late, run)["phase"] == views.run_row(live, run)["phase"] == "two"
    assert late.engine.runs_info(1016.0) == live.engine.runs_info(1016.0)


def test_a_replay_ends_what_ended_and_an_ended_run_stays_ended() -> None:
    live, _ = gameday()
    late, late_clock = gameday()
    first = prepare(live, "start", {"scenario": "s"}, 1000.0)
    second = prepare(live, "start", {"scenario": "s", "at": 1030.0}, 1025.0)
    late_clock.now = 1035.0
    assert apply(late, first, set(), catch_up=True) == "s-19700101T001640Z"
    assert apply(late, second, set(), catch_up=True) == "s-19700101T001710Z"
    assert list(late.reports) == ["s-19700101T001640Z"]  # the first ended in the replay
    assert list(late.runs) == ["s-19700101T001710Z"]


def test_a_scheduled_start_is_applied_once_however_often_appended() -> None:
    gd, _ = gameday()
    fired: set[tuple[str, float]] = set()
    op = prepare(gd, "start", {"scenario": "s", "at": 990.0, "trigger": "schedule"}, 1000.0)
    assert apply(gd, op, fired) == "s-19700101T001630Z"
    assert apply(gd, wire(op), fired) is None  # a second leader's append of the same start
    assert list(gd.runs) == ["s-19700101T001630Z"]
    api = prepare(gd, "start", {"scenario": "s", "at": 990.0}, 1000.0)
    assert apply(gd, api, fired) == "s-19700101T001630Z-2"  # an API start is its own run


def test_prepare_refuses_as_the_game_day_does() -> None:
    gd, _ = gameday()
    with pytest.raises(NotFound):
        prepare(gd, "start", {"scenario": "nope"}, 1000.0)
    with pytest.raises(NotFound):
        prepare(gd, "stop", {"ref": "nope"}, 1000.0)
    with pytest.raises(ValueError, match="already be over"):
        prepare(gd, "start", {"scenario": "s", "at": 900.0}, 1000.0)
    rule = Rule.model_validate({"match": {"suffix": "internal"}, "fault": "servfail"})
    add = prepare(gd, "rule_add", {"name": "x", "rule": rule, "duration": 5.0}, 1000.0)
    assert apply(gd, wire(add), set()) == "x"
    with pytest.raises(Conflict):
        prepare(gd, "rule_add", {"name": "x", "rule": rule}, 1001.0)
    with pytest.raises(NotFound):
        prepare(gd, "rule_remove", {"name": "y"}, 1001.0)
    with pytest.raises(ValueError, match="unknown operation"):
        Op.from_fields({"op": "drop_table", "t": "1.0", "args": "{}"})


def test_an_ad_hoc_rule_expires_at_its_deadline_on_every_instance() -> None:
    fleet = [gameday() for _ in range(2)]
    rule = Rule.model_validate({"match": {"suffix": "internal"}, "fault": "servfail"})
    add = wire(prepare(fleet[0][0], "rule_add", {"name": "x", "rule": rule, "duration": 5.0},
                       1000.0))
    for gd, clock in fleet:
        apply(gd, add, set())
        assert rcode(gd, 1004.9) == SERVFAIL
        clock.now = 1005.0
        gd.tick()
        assert gd.rules == {} and rcode(gd, 1005.0) is None
        assert apply(gd, prepare(gd, "rule_expired", {"name": "x"}, 1005.0), set()) is True


def test_reset_heals_every_instance_alike() -> None:
    fleet = [gameday()[0] for _ in range(2)]
    start = prepare(fleet[0], "start", {"scenario": "s"}, 1000.0)
    reset = prepare(fleet[0], "reset", {"detail": "reset by bob"}, 1003.0)
    for gd in fleet:
        run = apply(gd, start, set())
        assert apply(gd, reset, set()) == {"runs": [run], "rules": []}
        assert rcode(gd, 1004.0) is None
        assert gd.reports[run]["ended_because"] == "reset by bob"


# --- counts of several instances -----------------------------------------------------------


def client(client: str, names: dict[str, int], first: float, last: float,
           rule: str = "r1") -> dict[str, Any]:
    return {"run": "s-1", "phase": "one", "rule": rule, "client": client,
            "first_seen": first, "last_seen": last, "faults": {"nxdomain": sum(names.values())},
            "names": names, "faulted": names}


def test_a_client_seen_by_two_instances_is_one_client_with_summed_counts() -> None:
    rows = {
        "p2": {"stats": [{"run": "s-1", "phase": "one", "rule": "r1", "fault": "nxdomain",
                          "matched": 2, "injected": 2, "errors": 0}],
               "clients": [client("10.0.0.1", {"db.internal.": 2}, 5.0, 9.0)]},
        "p1": {"stats": [{"run": "s-1", "phase": "one", "rule": "r1", "fault": "nxdomain",
                          "matched": 3, "injected": 3, "errors": 1}],
               "clients": [client("10.0.0.1", {"db.internal.": 1, "a.internal.": 2}, 4.0, 6.0),
                           client("10.0.0.2", {"db.internal.": 4}, 7.0, 8.0)]},
    }
    stats, clients = merge_instances(rows)
    assert [(r["rule"], r["matched"], r["injected"], r["errors"]) for r in stats] == [
        ("r1", 5, 5, 1)]
    by = {c["client"]: c for c in clients}
    assert sorted(by) == ["10.0.0.1", "10.0.0.2"]
    assert by["10.0.0.1"]["names"] == {"db.internal.": 3, "a.internal.": 2}
    assert (by["10.0.0.1"]["first_seen"], by["10.0.0.1"]["last_seen"]) == (4.0, 9.0)
    assert by["10.0.0.1"]["faults"] == {"nxdomain": 5}
    assert by["10.0.0.2"]["names"] == {"db.internal.": 4}  # seen by one instance: unchanged


def test_rule_rows_of_different_rules_are_not_summed() -> None:
    a = {"phase": "one", "rule": "r1", "matched": 1, "injected": 1, "errors": 0}
    b = {"phase": "two", "rule": "r1", "matched": 7, "injected": 0, "errors": 0}
    assert merge_rule_rows([[a], [b]]) == [a, b]
    assert merge_rule_rows([]) == []


# --- the URL ----------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0", "rediss://redis.example:6380/2",
                                 "redis://user:pass@10.0.0.5:6379/1", "redis://localhost"])
def test_control_urls_accepted(url: str) -> None:
    assert check_control_url(url) == url
    assert Settings(control=url, upstreams=["127.0.0.1:53"]).control == url


@pytest.mark.parametrize(("url", "message"), [
    ("http://u:secret@h:6379/0", "the scheme must be redis:// or rediss://"),
    ("redis:///0", "names no host"),
    ("redis://h:port/0", "is not a valid URL"),
    ("redis://u:secret@h:6379/db", "the database must be a number"),
])
def test_control_urls_refused_without_showing_the_password(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        check_control_url(url)
    assert "secret" not in str(info.value)


def test_redact_hides_only_the_password() -> None:
    assert redact("rediss://user:hunter2@h:6380/1") == "rediss://user:***@h:6380/1"
    assert redact("redis://h:6379/0") == "redis://h:6379/0"


def test_control_settings_defaults() -> None:
    settings = Settings(upstreams=["127.0.0.1:53"])
    assert (settings.control, settings.control_grace, settings.control_prefix) == (
        None, 30.0, "dnschaos:")
    with pytest.raises(ValueError):
        Settings(upstreams=["127.0.0.1:53"], control_prefix="has space")
