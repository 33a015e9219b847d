"""What the engine counts, as rows: per rule, per (rule, client), per run.

Affected clients are counted per (run, rule, client): first and last seen
(wall clock), faults by type, the names of the queries the rule selected
(`names`) and of those its fault changed (`faulted`; a flap that is off
changes nothing).  Bounded: at most `client_cap` clients per rule (the rest
fold into the client "other") and 100 names each per client (the rest fold
into the name "other").
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from proxy.core.plan import PAUSED, RUNNING, ClientRecord, CompiledRule, Run
from proxy.core.query import QueryView

OTHER = "other"
"""The client (or name) that counts everything beyond the caps."""
NAMES_PER_CLIENT = 100


def count_client(clients: dict[str, ClientRecord], q: QueryView, now: float,
                 fault: str | None, client_cap: int) -> None:
    """Count a query a rule won (`fault`: its type when the fault did something)."""
    record = clients.get(q.client)
    if record is None:
        key = q.client if len(clients) < client_cap else OTHER
        record = clients.get(key)
        if record is None:
            record = clients[key] = ClientRecord(now, now)
    record.last_seen = now
    _count_name(record.names, q.qname)
    if fault is not None:
        record.faults[fault] = record.faults.get(fault, 0) + 1
        _count_name(record.faulted, q.qname)


def _count_name(names: dict[str, int], name: str) -> None:
    """One more query for `name`; past NAMES_PER_CLIENT names, under OTHER."""
    if name in names:
        names[name] += 1
    elif len(names) < NAMES_PER_CLIENT:
        names[name] = 1
    else:
        names[OTHER] = names.get(OTHER, 0) + 1


def rule_rows(rules: Iterable[CompiledRule]) -> list[dict[str, Any]]:
    """Per rule: run, scenario, phase, phase_index, rule, fault, dry_run,
    matched, injected, errors."""
    return [
        {
            "run": rule.run,
            "scenario": rule.scenario,
            "phase": rule.phase,
            "phase_index": rule.phase_index,
            "rule": rule.name,
            "fault": rule.fault.type,
            "dry_run": rule.dry_run,
            "matched": rule.counters.matched,
            "injected": rule.counters.injected,
            "errors": rule.counters.errors,
        }
        for rule in rules
    ]


def client_rows(rules: Iterable[CompiledRule]) -> list[dict[str, Any]]:
    """Per (run, rule, client): run, scenario, phase, rule, client, dry_run,
    first_seen, last_seen, faults {type: count}, names {name: count} (queries
    selected), faulted {name: count} (queries the fault changed)."""
    return [
        {
            "run": rule.run,
            "scenario": rule.scenario,
            "phase": rule.phase,
            "rule": rule.name,
            "client": client,
            "dry_run": rule.dry_run,
            "first_seen": record.first_seen,
            "last_seen": record.last_seen,
            "faults": dict(record.faults),
            "names": dict(record.names),
            "faulted": dict(record.faulted),
        }
        for rule in rules
        for client, record in list(rule.clients.items())
    ]


def run_rows(runs: Iterable[Run], now: float) -> list[dict[str, Any]]:
    """Per run: run, scenario, state, dry_run, phase, phase_index, remaining
    (seconds left in the phase; None outside a phase)."""
    out = []
    for run in runs:
        state = run.state(now)
        info = run.phase_info(now) if state in (RUNNING, PAUSED) else None
        out.append({
            "run": run.id,
            "scenario": run.scenario,
            "state": state,
            "dry_run": run.dry_run,
            "phase": info[1] if info else None,
            "phase_index": info[0] if info else None,
            "remaining": (min(info[2], run.hard_end - now) if state == RUNNING
                          else info[2]) if info else None,
        })
    return out
