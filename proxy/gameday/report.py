"""The run report: what happened, as JSON and Markdown.

`build_report` is pure: it takes the run's record (timeline, events, probe
results, why it ended) and the engine's per-rule and per-client rows, and
folds the clients across rules, so a team sees which services asked for the
broken names.  `write_report` writes `<run>.json` and `<run>.md`.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from proxy.core.schedule import format_time


def build_report(run: dict[str, Any], rules: list[dict[str, Any]],
                 clients: list[dict[str, Any]], probes: list[dict[str, Any]]) -> dict[str, Any]:
    """run: id, scenario, dry_run, trigger, who, started_at, ended_at, reason,
    detail, timeline, events (times in Unix seconds; shown as ISO 8601)."""
    per_rule = []
    by_rule_clients: dict[tuple[str, str], int] = {}
    for row in clients:
        key = (row["phase"], row["rule"])
        by_rule_clients[key] = by_rule_clients.get(key, 0) + 1
    for row in rules:
        per_rule.append({
            "phase": row["phase"], "rule": row["rule"], "fault": row["fault"],
            "matched": row["matched"], "injected": row["injected"], "errors": row["errors"],
            "clients": by_rule_clients.get((row["phase"], row["rule"]), 0),
        })
    folded: dict[str, dict[str, Any]] = {}
    for row in clients:
        entry = folded.setdefault(row["client"], {
            "client": row["client"], "first_seen": row["first_seen"],
            "last_seen": row["last_seen"], "queries": 0, "faults": {}, "names": {},
            "faulted": {}, "rules": [],
        })
        entry["first_seen"] = min(entry["first_seen"], row["first_seen"])
        entry["last_seen"] = max(entry["last_seen"], row["last_seen"])
        for fault, count in row["faults"].items():
            entry["faults"][fault] = entry["faults"].get(fault, 0) + count
        for name, count in row["names"].items():
            entry["names"][name] = entry["names"].get(name, 0) + count
            entry["queries"] += count
        for name, count in (row.get("faulted") or {}).items():
            entry["faulted"][name] = entry["faulted"].get(name, 0) + count
        rule = f"{row['phase']}/{row['rule']}" if row["phase"] != "adhoc" else row["rule"]
        if rule not in entry["rules"]:
            entry["rules"].append(rule)
    client_list = sorted(folded.values(), key=lambda c: (-c["queries"], c["client"]))
    for entry in client_list:
        entry["first_seen"] = format_time(entry["first_seen"])
        entry["last_seen"] = format_time(entry["last_seen"])
    names: dict[str, int] = {}
    faulted: dict[str, int] = {}
    for entry in client_list:
        for name, count in entry["names"].items():
            names[name] = names.get(name, 0) + count
        for name, count in entry["faulted"].items():
            faulted[name] = faulted.get(name, 0) + count
    return {
        "run": run["id"],
        "scenario": run["scenario"],
        "dry_run": run["dry_run"],
        "trigger": run.get("trigger"),
        "started_by": run.get("who"),
        "started_at": format_time(run["started_at"]),
        "ended_at": format_time(run.get("ended_at")),
        "duration": (None if run.get("ended_at") is None
                     else round(run["ended_at"] - run["started_at"], 3)),
        "ended": run.get("reason"),
        "ended_because": run.get("detail") or run.get("reason"),
        "timeline": [
            {"phase": p["phase"], "index": p["index"], "started_at": format_time(p["start"]),
             "ended_at": format_time(p.get("end"))}
            for p in run.get("timeline", [])
        ],
        "events": [{"time": format_time(e["time"]), "event": e["event"],
                    "detail": e.get("detail", "")} for e in run.get("events", [])],
        "rules": per_rule,
        "totals": {"matched": sum(r["matched"] for r in per_rule),
                   "injected": sum(r["injected"] for r in per_rule),
                   "clients": len(client_list)},
        "clients": client_list,
        "names": _by_count(names),
        "names_faulted": _by_count(faulted),
        "probes": probes,
    }


def _by_count(counts: dict[str, int]) -> dict[str, int]:
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    def cell(value: Any) -> str:
        return str(value if value is not None else "").replace("|", "\\|")

    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(cell(v) for v in row) + " |" for row in rows
    ]


def _client_behaviour(faults: set[str]) -> list[str]:
    """What the common stacks showed for these faults, as measured by
    bench/matrix.py (docs/client-behaviour.md); nothing for faults it did not measure."""
    table = json.loads(resources.files("proxy.data").joinpath("client_behaviour.json")
                       .read_text())["faults"]
    rows = [[fault, stack, seen["result"], seen["recovery"]]
            for fault in sorted(faults & set(table)) for stack, seen in table[fault].items()]
    if not rows:
        return []
    return ["## What clients would have seen", "",
            "Measured by bench/matrix.py (docs/client-behaviour.md), not in this run.", "",
            *_table(["fault", "client", "result", "back to the real answer after"], rows), ""]


def to_markdown(report: dict[str, Any]) -> str:
    dry = " (dry run: no answer was changed)" if report["dry_run"] else ""
    lines = [
        f"# Game day report: {report['scenario']}{dry}",
        "",
        f"- Run: `{report['run']}` ({report.get('trigger') or 'api'}"
        + (f", started by {report['started_by']}" if report.get("started_by") else "") + ")",
        f"- Started: {report['started_at']}",
        f"- Ended: {report['ended_at'] or 'still running'}"
        + (f" after {report['duration']:.1f} s" if report.get("duration") is not None else ""),
        f"- Why it ended: **{report['ended'] or 'running'}**"
        + (f": {report['ended_because']}" if report.get("ended_because")
           and report["ended_because"] != report["ended"] else ""),
        f"- Queries matched: {report['totals']['matched']}, faults "
        + ("that would have been " if report["dry_run"] else "")
        + f"injected: {report['totals']['injected']}, clients affected: "
        f"{report['totals']['clients']}",
        "",
        "## Timeline",
        "",
        *_table(["phase", "started", "ended"],
                [[f"{p['index'] + 1}. {p['phase']}", p["started_at"], p["ended_at"]]
                 for p in report["timeline"]]),
        "",
    ]
    if report["events"]:
        lines += ["Events:", ""] + [f"- {e['time']} {e['event']}"
                                    + (f": {e['detail']}" if e["detail"] else "")
                                    for e in report["events"]] + [""]
    lines += ["## Rules", "", *_table(
        ["phase", "rule", "fault", "matched", "injected", "errors", "clients"],
        [[r["phase"], r["rule"], r["fault"], r["matched"], r["injected"], r["errors"],
          r["clients"]] for r in report["rules"]]), ""]
    lines += _client_behaviour({r["fault"] for r in report["rules"]})
    lines += ["## Clients affected", ""]
    if report["clients"]:
        lines += _table(
            ["client", "first seen", "last seen", "queries", "faults", "names"],
            [[c["client"], c["first_seen"], c["last_seen"], c["queries"],
              ", ".join(f"{k}: {v}" for k, v in sorted(c["faults"].items())) or "-",
              ", ".join(list(c["names"])[:5]) + (" ..." if len(c["names"]) > 5 else "")]
             for c in report["clients"]])
    else:
        lines.append("No client sent a query that a rule selected.")
    would = " (would have)" if report["dry_run"] else ""
    lines += ["", "## Names faulted", "", f"The names whose queries got a fault{would}.", ""]
    faulted = report.get("names_faulted") or {}
    if faulted:
        lines += _table(["name", "faults"], [[n, c] for n, c in faulted.items()])
    else:
        lines.append("None.")
    lines += ["", "## Names asked", "",
              ("Every name of the queries a rule selected, from the clients above, whether "
               "or not a fault fired (a flap that was off); names no rule selected are not "
               "seen."), ""]
    if report["names"]:
        lines += _table(["name", "queries"], [[n, c] for n, c in report["names"].items()])
    else:
        lines.append("None.")
    recovery = report.get("recovery")
    if recovery is not None:
        state = "closed" if recovery["closed"] else "still open"
        lines += ["", "## Recovery", "",
                  f"Each client that got faults for a name, watched for "
                  f"{recovery['window']:g} s after the run ended (window {state}): "
                  "recovered (the upstream's real answer again, seconds after the end), "
                  "failing (the upstream itself fails), unseen (no query again: it stopped "
                  "asking, crashed, or sits in a negative cache).", ""]
        if recovery["entries"]:
            lines += _table(["client", "name", "status", "after (s)"],
                            [[e["client"], e["name"], e["status"],
                              "" if e["after"] is None else f"{e['after']:.1f}"]
                             for e in recovery["entries"]])
        else:
            lines.append("No client got a fault.")
    lines += ["", "## Probes", ""]
    if report["probes"]:
        lines += _table(
            ["probe", "kind", "target", "checks", "failed", "last"],
            [[p["name"], p["kind"], p["target"], p["checks"], p["failed"],
              (("ok" if p["last"]["ok"] else "FAIL") + f" {p['last']['detail']}")
              if p["last"] else "-"] for p in report["probes"]])
    else:
        lines.append("No probes.")
    return "\n".join(lines) + "\n"


def write_report(directory: str | Path, report: dict[str, Any]) -> list[Path]:
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    base = folder / _safe(report["run"])
    paths = [base.with_suffix(".json"), base.with_suffix(".md")]
    paths[0].write_text(json.dumps(report, indent=2) + "\n")
    paths[1].write_text(to_markdown(report))
    return paths


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
