"""Schedules, with the clock moved by hand (no sleeping)."""

from __future__ import annotations

import pytest

from proxy.core.model import Scenario
from proxy.core.schedule import (
    Scheduler,
    check_cron,
    format_time,
    last_start,
    next_start,
    occurrence_at,
    parse_time,
)
from proxy.errors import InvalidFile
from proxy.loader import load_scenario_text

T = parse_time  # "2026-12-01T14:00Z" -> Unix seconds; 2026-12-01 is a Tuesday


def test_parse_and_format_time() -> None:
    assert T("2026-12-01T14:00Z") == T("2026-12-01T15:00+01:00")
    assert format_time(T("2026-12-01T14:00Z")) == "2026-12-01T14:00:00.000Z"
    with pytest.raises(ValueError, match="no zone"):
        T("2026-12-01T14:00")
    with pytest.raises(ValueError, match="invalid time"):
        T("next tuesday")


def test_next_and_last_start_in_an_explicit_zone() -> None:
    # 14:00 in Paris is 13:00 UTC in winter.
    assert (next_start("0 14 * * TUE", "Europe/Paris", T("2026-12-01T12:00Z"))
            == T("2026-12-01T13:00Z"))
    assert next_start("0 14 * * TUE", "UTC", T("2026-12-01T14:00Z")) == T("2026-12-08T14:00Z")
    assert last_start("0 14 * * TUE", "UTC", T("2026-12-01T14:00Z")) == T("2026-12-01T14:00Z")
    assert last_start("0 14 * * TUE", "UTC", T("2026-12-01T13:59Z")) == T("2026-11-24T14:00Z")


@pytest.mark.parametrize(("now", "expected"), [
    ("2026-12-01T13:59:59Z", None),            # not yet
    ("2026-12-01T14:00Z", "2026-12-01T14:00Z"),  # the start itself
    ("2026-12-01T14:29:59Z", "2026-12-01T14:00Z"),
    ("2026-12-01T14:30Z", None),               # over (30 min long)
])
def test_occurrence_at(now: str, expected: str | None) -> None:
    got = occurrence_at("0 14 * * TUE", "UTC", T(now), 1800.0)
    assert got == (T(expected) if expected else None)


def test_scheduler_fires_each_start_once_and_rejoins_mid_run() -> None:
    sched = Scheduler()
    sched.set("game", "0 14 * * TUE", "UTC", 1800.0, T("2026-12-01T10:00Z"))
    assert sched.due(T("2026-12-01T10:00Z")) == []
    assert sched.next_wakeup(T("2026-12-01T10:00Z")) == T("2026-12-01T14:00Z")
    assert sched.due(T("2026-12-01T14:00:00.05Z")) == [("game", T("2026-12-01T14:00Z"))]
    assert sched.due(T("2026-12-01T14:00:01Z")) == []  # once
    assert sched.due(T("2026-12-08T14:00:00Z")) == [("game", T("2026-12-08T14:00Z"))]
    # A process started mid-run (a restart) gets the start of the current occurrence.
    fresh = Scheduler()
    fresh.set("game", "0 14 * * TUE", "UTC", 1800.0, T("2026-12-01T14:10Z"))
    assert fresh.due(T("2026-12-01T14:10Z")) == [("game", T("2026-12-01T14:00Z"))]
    # Changing the schedule keeps what was fired; removing it stops it.
    fresh.set("game", "0 14 * * TUE", "UTC", 3600.0, T("2026-12-01T14:20Z"))
    assert fresh.due(T("2026-12-01T14:40Z")) == []
    fresh.remove("game")
    assert fresh.due(T("2026-12-08T14:00Z")) == [] and fresh.next_wakeup(0) is None


def test_two_instances_agree_on_phases() -> None:
    # Both lay out phases from the cron time, whenever they noticed it.
    a, b = Scheduler(), Scheduler()
    for s in (a, b):
        s.set("game", "*/5 * * * *", "UTC", 120.0, 0.0)
    now = T("2026-12-01T14:05:00Z")
    assert a.due(now + 0.05) == b.due(now + 1.7) == [("game", now)]


BASE = "name: s\nphases: [{name: p, duration: 1m}]\n"


def test_model_schedule_keys_validate() -> None:
    scenario = load_scenario_text(BASE + "schedule: '0 14 * * TUE'\ntimezone: Europe/Paris\n"
                                  "max_duration: 30m\n")
    assert scenario.schedule == "0 14 * * TUE" and scenario.max_duration == 1800.0
    for extra, message in [
        ("schedule: '0 14 * * TUE'\n", "explicit timezone"),
        ("schedule: '61 14 * * TUE'\ntimezone: UTC\n", "invalid cron"),
        ("schedule: '0 14 * *'\ntimezone: UTC\n", "five fields"),
        ("schedule: '0 14 * * TUE'\ntimezone: Mars/Olympus\n", "unknown time zone"),
        ("timezone: UTC\n", "only meaningful with a schedule"),
    ]:
        with pytest.raises(InvalidFile, match=message):
            load_scenario_text(BASE + extra, "x.yaml")


def test_model_probes_validate() -> None:
    scenario = Scenario.model_validate({
        "name": "s", "phases": [{"name": "p", "duration": 1}],
        "probes": [{"name": "api", "http": "http://127.0.0.1:8080/health", "interval": "5s"},
                   {"name": "errors", "prometheus": {"url": "http://prom:9090",
                                                     "query": "rate(x[1m])", "max": 0.1}},
                   {"name": "smoke", "command": ["true"], "failures": 1}]})
    assert [p.kind for p in scenario.probes] == ["http", "prometheus", "command"]
    for probe, message in [
        ({"name": "x"}, "exactly one"),
        ({"name": "x", "http": "ftp://a"}, "http:// or https://"),
        ({"name": "x", "command": ["true"], "http": "http://a"}, "exactly one"),
    ]:
        with pytest.raises(InvalidFile, match=message):
            import yaml

            load_scenario_text(yaml.safe_dump({"name": "s", "probes": [probe], "phases": [
                {"name": "p", "duration": 1}]}), "x.yaml")


def test_check_cron() -> None:
    check_cron("0 14 * * TUE")
    with pytest.raises(ValueError):
        check_cron("every tuesday")
