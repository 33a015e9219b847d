"""The collector's engine-side metrics, fed by a fake engine with the
game-day API (stats, client_stats, runs_info), and the client grouping and
label cap on their own."""

from __future__ import annotations

from random import Random
from typing import Any

import dns.message
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from proxy.affected import OTHER, ClientFaults, ClientGroups, ClientLabels, affected_counts
from proxy.cli import build_parser, load_settings
from proxy.config import Settings
from proxy.core.engine import Engine
from proxy.core.query import QueryView
from proxy.gameday.runs import GameDay
from proxy.loader import load_scenario_text
from proxy.metrics import MetricsView, make_registry
from proxy.stats import Stats

NOW = 1_700_000_000.0
RUN = "r1"
"""The run id of the rows rule_row and client_row make by default."""


def rule_row(rule: str, fault: str = "nxdomain", *, matched: int = 0, injected: int = 0,
             dry_run: bool = False, scenario: str = "gd", phase: str = "p1",
             run: str = "r1") -> dict[str, Any]:
    return {"run": run, "scenario": scenario, "phase": phase, "phase_index": 0, "rule": rule,
            "fault": fault, "dry_run": dry_run, "matched": matched, "injected": injected,
            "errors": 0}


def client_row(client: str, rule: str = "r-nx", *, faults: dict[str, int] | None = None,
               first: float = NOW - 100, last: float = NOW - 1, dry_run: bool = False,
               scenario: str = "gd", run: str = "r1") -> dict[str, Any]:
    return {"run": run, "scenario": scenario, "phase": "p1", "rule": rule, "client": client,
            "dry_run": dry_run, "first_seen": first, "last_seen": last,
            "faults": {"nxdomain": 1} if faults is None else faults, "names": {"a.test": 1}}


class FakeEngine:
    def __init__(self, stats=(), clients=(), runs=()) -> None:
        self._stats, self._clients, self._runs = list(stats), list(clients), list(runs)

    def stats(self) -> list[dict]:
        return self._stats

    def client_stats(self) -> list[dict]:
        return self._clients

    def runs_info(self, now: float) -> list[dict]:
        return self._runs


def view(engine: Any) -> MetricsView:
    """A scrape's view of a process that got no queries, with `engine`'s rows."""
    return MetricsView(stats=Stats(), upstreams=[], inflight=0, counts=engine,
                       engine_errors=getattr(engine, "errors", 0))


def scrape(engine: Any, **settings: Any) -> dict[tuple[str, frozenset], float]:
    registry = make_registry(lambda: view(engine), Settings.model_validate(settings),
                             clock=lambda: NOW)
    text = generate_latest(registry).decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def samples(metrics: dict, name: str) -> dict[frozenset, float]:
    return {labels: value for (n, labels), value in metrics.items() if n == name}


def value(metrics: dict, name: str, **labels: str) -> float | None:
    return metrics.get((name, frozenset(labels.items())))


# --- rule counters and dry run ----------------------------------------------------------


def test_fault_counters_per_rule_and_dry_run_apart() -> None:
    engine = FakeEngine(stats=[
        rule_row("r-nx", matched=7, injected=6),
        rule_row("r-sf", "servfail", matched=3, injected=3),
        rule_row("r-dry", "servfail", matched=5, injected=0, dry_run=True, scenario="gd-dry"),
    ])
    m = scrape(engine)
    assert value(m, "dnschaos_faults_injected_total", run=RUN, scenario="gd", phase="p1",
                 rule="r-nx", fault="nxdomain") == 6
    assert value(m, "dnschaos_rule_matches_total", run=RUN, scenario="gd", phase="p1", rule="r-sf",
                 fault="servfail") == 3
    assert value(m, "dnschaos_dry_run_matches_total", run=RUN, scenario="gd-dry", rule="r-dry") == 5
    # A dry-run rule injects nothing and is not among the live rule counters...
    assert not [k for k in samples(m, "dnschaos_faults_injected_total")
                if ("rule", "r-dry") in k]
    # ...and live rules are not among the dry-run matches.
    assert set(samples(m, "dnschaos_dry_run_matches_total")) == {
        frozenset({("run", "r1"), ("scenario", "gd-dry"), ("rule", "r-dry")})}


# --- affected clients -------------------------------------------------------------------


def test_affected_clients_over_the_run_and_recent_window() -> None:
    engine = FakeEngine(clients=[
        client_row("10.0.0.1", last=NOW - 5),
        client_row("10.0.0.2", last=NOW - 90),  # affected, but not in the last 60 s
        client_row("10.0.0.1", rule="r-sf", faults={"servfail": 2}, last=NOW - 1),
        client_row("10.0.0.3", faults={}, last=NOW - 1),  # matched, no fault: not affected
        client_row("10.0.0.4", rule="r-dry", dry_run=True, scenario="gd-dry"),
        client_row("10.0.0.5", rule="r-dry", dry_run=True, scenario="gd-dry", faults={}),
    ])
    m = scrape(engine)
    assert samples(m, "dnschaos_affected_clients") == {
        frozenset({("run", "r1"), ("scenario", "gd"), ("rule", "r-nx")}): 2,
        frozenset({("run", "r1"), ("scenario", "gd"), ("rule", "r-sf")}): 1,
    }
    assert value(m, "dnschaos_affected_clients_recent", run=RUN, scenario="gd", rule="r-nx") == 1
    assert value(m, "dnschaos_affected_clients_recent", run=RUN, scenario="gd", rule="r-sf") == 1
    assert value(m, "dnschaos_dry_run_clients", run=RUN, scenario="gd-dry", rule="r-dry") == 1
    # The window is a setting.
    wide = scrape(engine, affected_window="120s")
    assert value(wide, "dnschaos_affected_clients_recent", run=RUN, scenario="gd", rule="r-nx") == 2


def test_two_runs_of_a_scenario_are_counted_apart() -> None:
    rows = [client_row("10.0.0.1", run="a"), client_row("10.0.0.1", run="b"),
            client_row("10.0.0.2", run="b")]
    assert affected_counts(rows, NOW, 60) == {("a", "gd", "r-nx"): (1, 1),
                                              ("b", "gd", "r-nx"): (2, 2)}


# --- per-client counters ----------------------------------------------------------------


def test_client_faults_per_address_and_absent_when_not_affected() -> None:
    engine = FakeEngine(clients=[
        client_row("127.0.0.2", faults={"nxdomain": 3}),
        client_row("127.0.0.2", rule="r-sf", faults={"servfail": 2}),
        client_row("127.0.0.3", faults={"nxdomain": 1, "delay": 4}),
        client_row("127.0.0.9", faults={}),  # matched only
        client_row("127.0.0.8", dry_run=True),  # dry run: received nothing
    ])
    m = scrape(engine)
    def key(client: str, fault: str) -> frozenset:
        return frozenset({("client", client), ("run", "r1"), ("scenario", "gd"), ("fault", fault)})

    assert samples(m, "dnschaos_client_faults_total") == {
        key("127.0.0.2", "nxdomain"): 3,
        key("127.0.0.2", "servfail"): 2,
        key("127.0.0.3", "nxdomain"): 1,
        key("127.0.0.3", "delay"): 4,
    }


def test_client_groups_most_specific_cidr_wins() -> None:
    engine = FakeEngine(clients=[
        client_row("10.1.2.7", faults={"nxdomain": 1}),
        client_row("10.1.2.8", faults={"nxdomain": 2}),
        client_row("10.1.9.1", faults={"nxdomain": 4}),
        client_row("10.1.2.200", faults={"nxdomain": 8}),
        client_row("192.0.2.1", faults={"nxdomain": 16}),
        client_row("fd00::5", faults={"nxdomain": 32}),
    ])
    m = scrape(engine, client_groups={"10.1.0.0/16": "staging", "10.1.2.0/24": "payments",
                                      "10.1.2.128/25": "payments-canary", "fd00::/8": "v6"})
    got = {dict(k)["client"]: v for k, v in samples(m, "dnschaos_client_faults_total").items()}
    assert got == {"payments": 3, "staging": 4, "payments-canary": 8, "192.0.2.1": 16, "v6": 32}
    # Distinct clients are still counted by address, not by group.
    assert value(m, "dnschaos_affected_clients", run=RUN, scenario="gd", rule="r-nx") == 6


def test_client_label_cap_first_seen_keep_labels_rest_other() -> None:
    rows = [client_row(f"10.0.0.{i}", faults={"nxdomain": 1}, first=NOW - 100 + i)
            for i in range(1, 8)]
    rows.append(client_row(OTHER, faults={"nxdomain": 10}, first=NOW - 1000))  # engine overflow
    m = scrape(FakeEngine(clients=list(reversed(rows))), client_label_cap=3)
    got = {dict(k)["client"]: v for k, v in samples(m, "dnschaos_client_faults_total").items()}
    assert got == {"10.0.0.1": 1, "10.0.0.2": 1, "10.0.0.3": 1, OTHER: 4 + 10}
    assert len(got) <= 3 + 1


def test_labels_are_sticky_so_counters_never_go_down() -> None:
    faults = ClientFaults({}, cap=2)
    first = faults.counts([client_row("10.0.0.5", first=NOW - 10, faults={"nxdomain": 1}),
                           client_row("10.0.0.6", first=NOW - 9, faults={"nxdomain": 1})])
    assert {k[0] for k in first} == {"10.0.0.5", "10.0.0.6"}
    # An earlier-seen client shows up later: the cap is full, so it is 'other' for good,
    # and the labelled ones keep their series.
    later = faults.counts([client_row("10.0.0.5", first=NOW - 10, faults={"nxdomain": 2}),
                           client_row("10.0.0.6", first=NOW - 9, faults={"nxdomain": 2}),
                           client_row("10.0.0.1", first=NOW - 50, faults={"nxdomain": 5})])
    assert later == {("10.0.0.5", RUN, "gd", "nxdomain"): 2,
                     ("10.0.0.6", RUN, "gd", "nxdomain"): 2, (OTHER, RUN, "gd", "nxdomain"): 5}
    for key, count in first.items():
        assert later[key] >= count


def test_cap_zero_puts_everyone_under_other() -> None:
    m = scrape(FakeEngine(clients=[client_row("10.0.0.1"), client_row("10.0.0.2")]),
               client_label_cap=0)
    got = {dict(k)["client"]: v for k, v in samples(m, "dnschaos_client_faults_total").items()}
    assert got == {OTHER: 2}


def test_a_flood_of_clients_stays_bounded() -> None:
    rows = [client_row(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", first=NOW - i)
            for i in range(20_000)]
    m = scrape(FakeEngine(clients=rows))
    labels = {dict(k)["client"] for k in samples(m, "dnschaos_client_faults_total")}
    assert len(labels) == 51 and OTHER in labels
    assert sum(samples(m, "dnschaos_client_faults_total").values()) == 20_000
    assert value(m, "dnschaos_affected_clients", run=RUN, scenario="gd", rule="r-nx") == 20_000


@pytest.mark.parametrize("client, want", [
    ("10.1.2.3", "payments"), ("10.1.3.3", "staging"), ("10.2.0.1", "10.2.0.1"),
    ("::ffff:10.1.2.3", "payments"), ("2001:db8::1", "doc6"), ("other", "other"),
    ("not-an-ip", "not-an-ip"),
])
def test_client_groups_lookup(client: str, want: str) -> None:
    groups = ClientGroups({"10.1.0.0/16": "staging", "10.1.2.0/24": "payments",
                           "2001:db8::/32": "doc6"})
    assert groups(client) == want
    assert groups(client) == want  # cached


def test_client_labels_order_is_deterministic() -> None:
    a, b = ClientLabels(2), ClientLabels(2)
    a.admit({"x": 3.0, "y": 1.0, "z": 2.0})
    b.admit({"z": 2.0, "x": 3.0, "y": 1.0})
    assert a.labelled == b.labelled == {"y", "z"}
    assert a("x") == OTHER


# --- runs ---------------------------------------------------------------------------


def test_runs_info_and_active_phase() -> None:
    engine = FakeEngine(runs=[
        {"run": "r1", "scenario": "gd", "state": "running", "dry_run": False,
         "phase": "outage", "phase_index": 1, "remaining": 12.5},
        {"run": "r2", "scenario": "other-gd", "state": "paused", "dry_run": True,
         "phase": "p1", "phase_index": 0, "remaining": 3.0},
        {"run": "r3", "scenario": "later", "state": "scheduled", "dry_run": False,
         "phase": None, "phase_index": None, "remaining": None},
    ])
    m = scrape(engine)
    assert samples(m, "dnschaos_active_phase") == {
        frozenset({("scenario", "gd"), ("phase", "outage")}): 1}
    assert value(m, "dnschaos_run_info", run="r1", scenario="gd", state="running",
                 phase="outage", dry_run="false") == 1
    assert value(m, "dnschaos_run_info", run="r2", scenario="other-gd", state="paused",
                 phase="p1", dry_run="true") == 1
    assert value(m, "dnschaos_run_info", run="r3", scenario="later", state="scheduled",
                 phase="", dry_run="false") == 1
    assert value(m, "dnschaos_run_phase_remaining_seconds", run="r1", scenario="gd") == 12.5
    assert value(m, "dnschaos_run_phase_remaining_seconds", run="r3", scenario="later") is None


def test_settings_defaults_and_validation() -> None:
    s = Settings()
    assert (s.client_groups, s.client_label_cap, s.affected_window) == ({}, 50, 60.0)
    s = Settings.model_validate({"client_groups": {"10.1.2.9/24": "payments"},
                                 "affected_window": "2m", "client_label_cap": 5})
    assert s.client_groups == {"10.1.2.0/24": "payments"} and s.affected_window == 120.0
    for bad in ({"client_groups": {"10.1.2.0/33": "x"}}, {"client_groups": {"10.0.0.0/8": ""}},
                {"client_label_cap": -1}, {"affected_window": "0s"}):
        with pytest.raises(ValueError):
            Settings.model_validate(bad)


# --- with the real engine ------------------------------------------------------------

SCENARIO = """\
name: gd
phases:
  - name: outage
    duration: 60s
    rules:
      - name: r-nx
        match: {name: www.example.test, clients: [10.1.2.0/24, 10.9.0.1/32]}
        fault: nxdomain
"""


def test_real_engine_rows_become_metrics() -> None:
    engine = Engine()

    scenario = load_scenario_text(SCENARIO)
    engine.add_run("live", scenario, NOW - 10, NOW - 10)
    dry = scenario.model_copy(update={"name": "gd-dry"})
    engine.add_run("dry", dry, NOW - 10, NOW - 10, dry_run=True)
    rng = Random(0)

    def ask(client: str, name: str = "www.example.test.", at: float = NOW - 5) -> None:
        wire = dns.message.make_query(name, "A").to_wire()
        engine.on_query(QueryView.parse(wire, client, "udp"), at, rng)

    for client, times in (("10.1.2.7", 3), ("10.1.2.8", 2), ("10.9.0.1", 1), ("10.9.0.2", 4)):
        for _ in range(times):
            ask(client)
    ask("10.1.2.7", "mail.example.test.")  # not selected: no fault
    m = scrape(engine, client_groups={"10.1.2.0/24": "payments"})
    assert value(m, "dnschaos_faults_injected_total", run="live", scenario="gd", phase="outage",
                 rule="r-nx", fault="nxdomain") == 6
    assert value(m, "dnschaos_dry_run_matches_total", run="dry", scenario="gd-dry",
                 rule="r-nx") == 6
    assert value(m, "dnschaos_affected_clients", run="live", scenario="gd", rule="r-nx") == 3
    assert value(m, "dnschaos_affected_clients_recent", run="live", scenario="gd", rule="r-nx") == 3
    assert value(m, "dnschaos_dry_run_clients", run="dry", scenario="gd-dry", rule="r-nx") == 3
    got = {dict(k)["client"]: v for k, v in samples(m, "dnschaos_client_faults_total").items()}
    assert got == {"payments": 5, "10.9.0.1": 1}  # 10.9.0.2 was never selected
    assert value(m, "dnschaos_active_phase", scenario="gd", phase="outage") == 1
    assert value(m, "dnschaos_run_info", run="dry", scenario="gd-dry", state="running",
                 phase="outage", dry_run="true") == 1
    assert value(m, "dnschaos_active_phase", scenario="gd-dry", phase="outage") is None


# --- ended runs: kept for ended_run_retention, with their run id ---------------------------


def test_ended_runs_series_stay_for_the_retention_then_go() -> None:
    """The engine forgets a run when it ends; /metrics keeps showing its final
    counts, under its run id, for ended_run_retention seconds (clock injected)."""
    now = [NOW]
    engine = Engine()
    gd = GameDay(engine, clock=lambda: now[0], ended_run_retention=600.0)
    gd.add_scenario(load_scenario_text(SCENARIO))
    registry = make_registry(lambda: view(engine), Settings(), clock=lambda: now[0],
                             ended=gd)

    def scrape_now() -> dict[tuple[str, frozenset], float]:
        text = generate_latest(registry).decode()
        return {(s.name, frozenset(s.labels.items())): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def ask(times: int, client: str = "10.1.2.7") -> None:
        wire = dns.message.make_query("www.example.test.", "A").to_wire()
        for _ in range(times):
            assert engine.on_query(QueryView.parse(wire, client, "udp"), now[0], Random(0))

    first = gd.start("gd")
    ask(3)
    now[0] += 1
    gd.stop(first.id)
    assert engine.get_run(first.id) is None  # the engine forgot it...
    now[0] += 5
    second = gd.start("gd")
    ask(2, "10.9.0.1")
    rule = {"scenario": "gd", "phase": "outage", "rule": "r-nx", "fault": "nxdomain"}
    m = scrape_now()
    # ...yet its counts are still there, apart from the new run's.
    assert value(m, "dnschaos_faults_injected_total", run=first.id, **rule) == 3
    assert value(m, "dnschaos_rule_matches_total", run=first.id, **rule) == 3
    assert value(m, "dnschaos_faults_injected_total", run=second.id, **rule) == 2
    assert value(m, "dnschaos_affected_clients", run=first.id, scenario="gd", rule="r-nx") == 1
    assert value(m, "dnschaos_client_faults_total", client="10.1.2.7", run=first.id,
                 scenario="gd", fault="nxdomain") == 3
    assert value(m, "dnschaos_run_info", run=first.id, scenario="gd", state="ended",
                 phase="", dry_run="false") == 1
    # Just before the retention is over: still there.
    now[0] = NOW + 1 + 600 - 0.001
    assert value(scrape_now(), "dnschaos_faults_injected_total", run=first.id, **rule) == 3
    # Once it is over: gone, the live run's series stay.
    now[0] = NOW + 1 + 600
    m = scrape_now()
    assert not [k for (name, k) in m if ("run", first.id) in k]
    assert value(m, "dnschaos_faults_injected_total", run=second.id, **rule) == 2
    assert first.id not in gd.ended  # memory freed too


def test_ended_run_retention_setting_and_flag() -> None:
    assert Settings().ended_run_retention == 600.0
    assert Settings.model_validate({"ended_run_retention": "2m"}).ended_run_retention == 120.0
    with pytest.raises(ValueError):
        Settings.model_validate({"ended_run_retention": "0s"})
    args = build_parser().parse_args(["run", "--upstream", "127.0.0.1:53",
                                      "--ended-run-retention", "90s"])
    assert load_settings(args).ended_run_retention == 90.0


def test_engine_errors_total_does_not_go_down_when_a_run_ends() -> None:
    """A rule's errors count in dnschaos_engine_errors_total while its run
    lives and after the engine forgets it, past the retention too: a
    Prometheus counter never goes down."""
    now = [NOW]
    engine = Engine()
    gd = GameDay(engine, clock=lambda: now[0], ended_run_retention=60.0)
    gd.add_scenario(load_scenario_text(SCENARIO))
    registry = make_registry(lambda: view(engine), Settings(), clock=lambda: now[0],
                             ended=gd)

    def errors_total() -> float:
        text = generate_latest(registry).decode()
        return value({(s.name, frozenset(s.labels.items())): s.value
                      for family in text_string_to_metric_families(text)
                      for s in family.samples}, "dnschaos_engine_errors_total")

    def boom(*args: object) -> None:
        raise RuntimeError("a bug in a fault")

    wire = dns.message.make_query("www.example.test.", "A").to_wire()
    assert errors_total() == 0
    runs = []
    for expected in (2, 4):
        run = gd.start("gd")
        runs.append(run.id)
        (rule,) = engine.rules(run.id)
        rule.fault.apply = boom  # type: ignore[method-assign]
        for _ in range(2):  # fails open: forwarded unchanged
            assert engine.on_query(QueryView.parse(wire, "10.1.2.7", "udp"), now[0],
                                   Random(0)) is None
        assert errors_total() == expected  # counted while the run lives
        now[0] += 1
        gd.stop(run.id)
        assert engine.get_run(run.id) is None
        assert errors_total() == expected  # and after the engine forgot it
    now[0] += 3600  # past the retention: the runs' series are gone, the total stays
    assert errors_total() == 4
