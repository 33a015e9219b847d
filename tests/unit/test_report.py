"""The run report: clients folded across rules, JSON and Markdown."""

from __future__ import annotations

import json
from pathlib import Path

from proxy.gameday.report import build_report, to_markdown, write_report

RUN = {"id": "s-1", "scenario": "s", "dry_run": False, "trigger": "api", "who": "alice",
       "started_at": 0.0, "ended_at": 20.0, "reason": "aborted",
       "detail": "probe api failed 2 time(s) in a row: HTTP 503",
       "timeline": [{"index": 0, "phase": "one", "start": 0.0, "end": 10.0},
                    {"index": 1, "phase": "two", "start": 10.0, "end": 20.0}],
       "events": [{"time": 20.0, "event": "aborted", "detail": "probe api failed"}]}
RULES = [
    {"run": "s-1", "scenario": "s", "phase": "one", "phase_index": 0, "rule": "a",
     "fault": "nxdomain", "dry_run": False, "matched": 3, "injected": 3, "errors": 0},
    {"run": "s-1", "scenario": "s", "phase": "two", "phase_index": 1, "rule": "b",
     "fault": "servfail", "dry_run": False, "matched": 1, "injected": 1, "errors": 0},
]
CLIENTS = [
    {"run": "s-1", "scenario": "s", "phase": "one", "rule": "a", "client": "10.0.0.1",
     "dry_run": False, "first_seen": 1.0, "last_seen": 5.0, "faults": {"nxdomain": 2},
     "names": {"db.internal": 2, "flap.internal": 3}, "faulted": {"db.internal": 2}},
    {"run": "s-1", "scenario": "s", "phase": "two", "rule": "b", "client": "10.0.0.1",
     "dry_run": False, "first_seen": 11.0, "last_seen": 11.0, "faults": {"servfail": 1},
     "names": {"cache.internal": 1}, "faulted": {"cache.internal": 1}},
    {"run": "s-1", "scenario": "s", "phase": "one", "rule": "a", "client": "10.0.0.7",
     "dry_run": False, "first_seen": 2.0, "last_seen": 2.0, "faults": {"nxdomain": 1},
     "names": {"db.internal": 1}, "faulted": {"db.internal": 1}},
]


def test_report_folds_clients_and_keeps_why() -> None:
    report = build_report(RUN, RULES, CLIENTS, [])
    assert report["ended"] == "aborted" and "HTTP 503" in report["ended_because"]
    assert report["duration"] == 20.0
    first, second = report["clients"]
    assert first == {"client": "10.0.0.1", "first_seen": "1970-01-01T00:00:01.000Z",
                     "last_seen": "1970-01-01T00:00:11.000Z", "queries": 6,
                     "faults": {"nxdomain": 2, "servfail": 1},
                     "names": {"db.internal": 2, "flap.internal": 3, "cache.internal": 1},
                     "faulted": {"db.internal": 2, "cache.internal": 1},
                     "rules": ["one/a", "two/b"]}
    assert second["client"] == "10.0.0.7"
    # Every name asked (a flap that was off for flap.internal), and the names faulted.
    assert report["names"] == {"db.internal": 3, "flap.internal": 3, "cache.internal": 1}
    assert list(report["names"]) == ["db.internal", "flap.internal", "cache.internal"]
    assert report["names_faulted"] == {"db.internal": 3, "cache.internal": 1}
    assert [r["clients"] for r in report["rules"]] == [2, 1]
    assert report["totals"] == {"matched": 4, "injected": 4, "clients": 2}
    assert [p["started_at"] for p in report["timeline"]] == [
        "1970-01-01T00:00:00.000Z", "1970-01-01T00:00:10.000Z"]


def test_markdown_and_files(tmp_path: Path) -> None:
    report = build_report(RUN, RULES, CLIENTS, [{
        "name": "api", "kind": "http", "target": "http://x/health", "interval": 1.0,
        "failures_allowed": 2, "checks": 3, "failed": 2, "consecutive_failures": 2,
        "last": {"time": "t", "ok": False, "detail": "HTTP 503"}, "history": []}])
    text = to_markdown(report)
    assert "| 10.0.0.1 |" in text and "| 10.0.0.7 |" in text
    faulted = text.split("## Names faulted", 1)[1].split("\n## ", 1)[0]
    asked = text.split("## Names asked", 1)[1].split("\n## ", 1)[0]
    assert "| db.internal | 3 |" in faulted and "flap.internal" not in faulted
    assert "| flap.internal | 3 |" in asked and "| cache.internal | 1 |" in asked
    assert "**aborted**: probe api failed" in text and "FAIL HTTP 503" in text
    json_path, md_path = write_report(tmp_path, report)
    assert json.loads(json_path.read_text()) == report and md_path.read_text() == text


def test_empty_report() -> None:
    report = build_report({**RUN, "timeline": [], "events": []}, [], [], [])
    text = to_markdown(report)
    assert "No client sent a query" in text and report["clients"] == []
    assert "What clients would have seen" not in text  # no fault injected


def test_markdown_quotes_the_client_matrix_for_the_faults_injected() -> None:
    text = to_markdown(build_report(RUN, RULES, CLIENTS, []))
    section = text.split("## What clients would have seen", 1)[1].split("\n## ", 1)[0]
    assert "| nxdomain | glibc getaddrinfo | EAI_NONAME |" in section
    assert "| servfail | glibc getaddrinfo | EAI_AGAIN |" in section
    assert "| drop |" not in section  # not injected in this run
    flap = [{**RULES[0], "fault": "flap"}]  # a fault the matrix does not measure
    assert "What clients would have seen" not in to_markdown(build_report(RUN, flap, [], []))
