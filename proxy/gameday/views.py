"""Read-only views of the game day, as the admin API shows them: runs,
ad hoc rules and the status page.  Each view first lets the manager tick, so
a run the engine just ended is shown as ended (and reported)."""

from __future__ import annotations

from typing import Any

from proxy.core.engine import ENDED
from proxy.core.schedule import format_time
from proxy.gameday.records import NotFound, RunRecord, rule_run
from proxy.gameday.runs import GameDay


def rule_rows(gd: GameDay) -> list[dict[str, Any]]:
    gd.tick()
    stats = {(row["run"]): row for row in gd.engine.stats()}
    out = []
    for record in gd.rules.values():
        row = stats.get(rule_run(record.name), {})
        out.append({
            "name": record.name, "dry_run": record.dry_run,
            "match": record.rule.match.model_dump(by_alias=True, exclude_none=True)
            or "all",
            "fault": record.rule.fault.model_dump(by_alias=True, exclude_none=True),
            "added_at": format_time(record.added_at),
            "expires_at": format_time(record.expires_at),
            "remaining": (None if record.expires_at is None
                          else max(0.0, record.expires_at - gd.clock())),
            "matched": row.get("matched", 0), "injected": row.get("injected", 0),
            "who": record.who, "duration": (None if record.expires_at is None
                                            else record.expires_at - record.added_at),
            "warnings": record.warnings,
        })
    return out


def run_rows(gd: GameDay) -> list[dict[str, Any]]:
    gd.tick()
    now = gd.clock()
    info = {row["run"]: row for row in gd.engine.runs_info(now)}
    rows = []
    for record in sorted(gd.runs.values(), key=lambda r: (r.started_at, r.id)):
        row = info.get(record.id, {})
        rows.append(_row(record, row.get("state", ENDED), row, now))
    for run_id, report in reversed(gd.reports.items()):
        rows.append({
            "run": run_id, "scenario": report["scenario"], "state": "ended",
            "dry_run": report["dry_run"], "phase": None, "phase_index": None,
            "remaining": None, "started_at": report["started_at"],
            "ended_at": report["ended_at"], "ended": report["ended"],
            "ended_because": report["ended_because"],
        })
    return rows


def _row(record: RunRecord, state: str, row: dict[str, Any],
         now: float) -> dict[str, Any]:
    return {
        "run": record.id, "scenario": record.scenario.name, "state": state,
        "dry_run": record.dry_run, "phase": row.get("phase"),
        "phase_index": row.get("phase_index"), "remaining": row.get("remaining"),
        "phases": len(record.scenario.phases), "trigger": record.trigger,
        "started_at": format_time(record.started_at),
        "hard_end": format_time(record.hard_end),
        "time_left": max(0.0, record.hard_end - now),
        "max_duration": record.max_duration,
        "time_scale": record.scenario.time_scale,
        "warnings": record.warnings,
    }


def run_row(gd: GameDay, run_id: str) -> dict[str, Any]:
    for row in run_rows(gd):
        if row["run"] == run_id:
            if run_id in gd.runs:
                record = gd.runs[run_id]
                row["timeline"] = [
                    {"phase": p["phase"], "index": p["index"],
                     "started_at": format_time(p["start"]), "ended_at": format_time(p["end"])}
                    for p in record.timeline]
                row["probes"] = record.probes.summary() if record.probes else []
                row["rules"] = gd.engine.stats(run_id)
            row["recovery"] = gd.recovery(run_id)
            return row
    raise NotFound(f"no run called {run_id!r}")


def status(gd: GameDay) -> dict[str, Any]:
    now = gd.clock()
    return {
        "time": format_time(now),
        "active": gd.engine.active,
        "runs": [r for r in run_rows(gd) if r["state"] != "ended"],
        "rules": rule_rows(gd),
        "schedules": [
            {"scenario": name, "schedule": e.cron, "timezone": e.tz,
             "next_start": format_time(gd.scheduler.upcoming(name, now))}
            for name, e in gd.scheduler.entries.items()],
        "scenario_errors": dict(gd.catalog.errors),
        "skipped_starts": list(gd.skipped),
        "max_run_duration": gd.max_run_duration,
    }
