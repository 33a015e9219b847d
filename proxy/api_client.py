"""The `dnschaos` client subcommands: they call the admin API over HTTP and
print readable tables (or the API's JSON with --json)."""

from __future__ import annotations

import argparse
import csv
import getpass
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from proxy.config import DEFAULT_ADMIN
from proxy.core.schedule import format_time
from proxy.errors import DnschaosError
from proxy.gameday.report import to_markdown

ENV_API = "DNSCHAOS_API"
"""The admin API's URL for the client commands (`dnschaos run` takes its own
listen address from DNSCHAOS_ADMIN_LISTEN)."""
ENV_TOKEN = "DNSCHAOS_ADMIN_TOKEN"


class ApiError(DnschaosError):
    """The admin API refused the request."""


class Client:
    def __init__(self, admin: str, token: str | None = None, timeout: float = 10.0) -> None:
        self.base = admin if "://" in admin else f"http://{admin}"
        self.base = self.base.rstrip("/")
        self.token = token
        self.timeout = timeout

    def call(self, method: str, path: str, body: Any = None,
             query: dict[str, str] | None = None, raw: bool = False) -> Any:
        url = self.base + path + ("?" + urllib.parse.urlencode(query) if query else "")
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Accept": "application/json"}
        try:
            headers["X-Dnschaos-User"] = getpass.getuser()
        except Exception:  # noqa: BLE001 - no user name: anonymous
            pass
        if data is not None:
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as resp:
                text = resp.read().decode()
        except urllib.error.HTTPError as err:
            text = err.read().decode(errors="replace")
            try:
                message = json.loads(text).get("error", text)
            except ValueError:
                message = text
            raise ApiError(f"{method} {path}: HTTP {err.code}: {message}") from None
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise ApiError(f"cannot reach the admin API at {self.base}: {reason}") from None
        return text if raw else json.loads(text)


# --- output ---------------------------------------------------------------------------------


def table(rows: list[dict[str, Any]], columns: list[str], headers: list[str] | None = None) -> str:
    headers = headers or [c.upper() for c in columns]
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=False)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=False)).rstrip()
              for r in cells]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.1f}"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value) or "-"
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items()) or "-"
    return str(value)


# --- commands ---------------------------------------------------------------------------------


def add_client_commands(commands: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--admin", default=None, metavar="URL",
                        help=f"the proxy's admin API (default ${ENV_API} or {DEFAULT_ADMIN})")
    common.add_argument("--token", default=None,
                        help=f"bearer token, sent with every request: changes need it, and "
                             f"reads too when the admin listener is off loopback "
                             f"(default ${ENV_TOKEN})")
    common.add_argument("--json", action="store_true", help="print the API's JSON")

    scenario = commands.add_parser("scenario", help="list, start and stop scenarios (via the API)")
    sub = scenario.add_subparsers(dest="action", required=True)
    sub.add_parser("list", parents=[common], help="scenarios the proxy knows")
    show = sub.add_parser("show", parents=[common], help="one scenario with its phases")
    show.add_argument("name")
    start = sub.add_parser("start", parents=[common], help="start a run now or at a time")
    start.add_argument("name")
    start.add_argument("--at", help="start time, ISO 8601 with a zone: 2026-12-01T14:00Z")
    start.add_argument("--dry-run", action="store_true",
                       help="count what would be affected, change no answer")
    start.add_argument("--time-scale", type=float, metavar="FACTOR")
    start.add_argument("--max-duration", metavar="DURATION", help="hard limit, e.g. 30m")
    start.add_argument("--require-traffic", action="store_true",
                       help="refuse to start when a rule would select no query of the last hour")
    for action, text in (("stop", "stop runs"), ("pause", "pause runs (their phases freeze)"),
                         ("resume", "resume paused runs")):
        p = sub.add_parser(action, parents=[common], help=text)
        p.add_argument("run", help="a run id, or a scenario name (all its runs)")
        if action == "stop":
            p.add_argument("--reason", help="why, for the report and the audit log")
    status = sub.add_parser("status", parents=[common], help="runs, phases, time left")
    status.add_argument("run", nargs="?")

    rule = commands.add_parser("rule", help="ad hoc rules (via the API)")
    rsub = rule.add_subparsers(dest="action", required=True)
    add = rsub.add_parser("add", parents=[common], help="add one rule with an expiry")
    add.add_argument("name")
    add.add_argument("--fault", required=True,
                     help="a fault type (nxdomain, servfail, drop...) or a JSON/YAML mapping")
    add.add_argument("--match", default=None, help="a JSON/YAML selector mapping")
    add.add_argument("--qname", action="append", dest="names", metavar="NAME",
                     help="select this exact name (repeatable)")
    add.add_argument("--suffix", action="append", help="select this zone (repeatable)")
    add.add_argument("--client", action="append", dest="clients", metavar="CIDR")
    add.add_argument("--all", action="store_true", dest="match_all",
                     help="select every query (needed when no selector is given)")
    add.add_argument("--for", dest="duration", default="5m", metavar="DURATION",
                     help="expiry (default 5m)")
    add.add_argument("--dry-run", action="store_true")
    rm = rsub.add_parser("rm", parents=[common], help="remove a rule")
    rm.add_argument("name")
    rsub.add_parser("list", parents=[common], help="the ad hoc rules")

    deps = commands.add_parser("deps", parents=[common],
                               help="the dependency map: which client asked for which names")
    deps.add_argument("--by", choices=["client", "name"], default="client",
                      help="client -> names (default) or name -> clients")
    deps.add_argument("--client", help="one client: an address or a client_groups name")
    deps.add_argument("--suffix", help="names under this zone only")
    deps.add_argument("--since", help="seen within this long (10m) or since a time (ISO 8601)")
    fmt = deps.add_mutually_exclusive_group()
    fmt.add_argument("--csv", action="store_true", help="CSV rows")
    fmt.add_argument("--dot", action="store_true", help="a Graphviz graph, client -> name")
    preview = commands.add_parser("preview", parents=[common],
                                  help="who a scenario would hit, from the dependency map")
    preview.add_argument("scenario", metavar="FILE|NAME",
                         help="a scenario file, or the name of a scenario the proxy knows")
    preview.add_argument("--window", default="1h",
                         help="how far back the map is read (default 1h)")

    recovery = commands.add_parser(
        "recovery", parents=[common],
        help="whether the clients a run hit get real answers again (after the run)")
    recovery.add_argument("run", help="run id, or a scenario name: its latest run")

    commands.add_parser("reset", parents=[common], help="heal everything at once")
    report = commands.add_parser("report", parents=[common], help="a run's report")
    report.add_argument("run", nargs="?",
                        help="run id, or a scenario name: its latest run (none: list the reports)")
    report.add_argument("--markdown", action="store_true", help="print the Markdown report")


def run_client(args: argparse.Namespace) -> int:
    admin = args.admin or os.environ.get(ENV_API) or DEFAULT_ADMIN
    client = Client(admin, args.token or os.environ.get(ENV_TOKEN))
    out: Any
    command = args.command
    action = getattr(args, "action", None)
    if command == "scenario" and action == "list":
        out = client.call("GET", "/api/scenarios")
        text = table(out["scenarios"], ["name", "phases", "duration", "schedule", "timezone",
                                        "next_start", "running"])
        if out["errors"]:
            text += "\n\nrefused files:\n" + "\n".join(out["errors"].values())
        return _print(args, out, text)
    if command == "scenario" and action == "show":
        out = client.call("GET", f"/api/scenarios/{_q(args.name)}")
        text = (f"{out['name']}: {out['description']}\n"
                f"file {out['file']}, {out['duration']:.1f} s, schedule "
                f"{out['schedule'] or '-'} {out['timezone'] or ''}\n\n"
                + table([{"phase": p["name"], "starts_after": p["starts_after"],
                          "duration": p["duration"],
                          "rules": [r["name"] for r in p["rules"]]} for p in out["phases"]],
                        ["phase", "starts_after", "duration", "rules"]))
        return _print(args, out, text)
    if command == "scenario" and action == "start":
        body: dict[str, Any] = {"dry_run": args.dry_run}
        if args.at:
            body["at"] = args.at
        if args.time_scale is not None:
            body["time_scale"] = args.time_scale
        if args.max_duration:
            body["max_duration"] = args.max_duration
        if args.require_traffic:
            body["require_traffic"] = True
        out = client.call("POST", f"/api/scenarios/{_q(args.name)}/start", body)
        _warn(out)
        _preflight(out.get("preflight"))
        return _print(args, out, f"run {out['run']} {out['state']}"
                      f" (starts {out['started_at']}, hard end {out['hard_end']})"
                      + (" [dry run]" if out["dry_run"] else ""))
    if command == "scenario" and action in ("stop", "pause", "resume"):
        body = {"reason": args.reason} if action == "stop" and args.reason else {}
        out = client.call("POST", f"/api/runs/{_q(args.run)}/{action}", body)
        done = out[action + ("ped" if action == "stop" else "d")]
        return _print(args, out, f"{action}: {', '.join(done)}" if done
                      else f"{action}: nothing to do (no live run {args.run})")
    if command == "scenario" and action == "status":
        if args.run:
            out = client.call("GET", f"/api/runs/{_q(args.run)}")
            text = table([out], ["run", "scenario", "state", "phase", "remaining", "time_left"])
            if out.get("timeline"):
                text += "\n\n" + table(out["timeline"], ["phase", "started_at", "ended_at"])
            return _print(args, out, text)
        out = client.call("GET", "/api/status")
        text = table(out["runs"], ["run", "scenario", "state", "dry_run", "phase", "remaining",
                                   "time_left"]) if out["runs"] else "no run"
        if out["rules"]:
            text += "\n\n" + table(out["rules"], ["name", "fault", "remaining", "matched"])
        return _print(args, out, text)
    if command == "rule" and action == "add":
        body = {"name": args.name, "fault": _mapping(args.fault), "duration": args.duration,
                "dry_run": args.dry_run}
        match = _mapping(args.match) if args.match else {}
        if not isinstance(match, dict):
            raise DnschaosError(f"--match must be a mapping, not {args.match!r}")
        if args.names:
            match["name"] = args.names
        if args.suffix:
            match["suffix"] = args.suffix
        if args.clients:
            match["clients"] = args.clients
        if args.match_all and match:
            raise DnschaosError("--all selects every query: give it without selectors")
        if not args.match_all and not match:
            raise DnschaosError("a rule needs a selector (--qname, --suffix, --client, "
                                "--match) or --all to fault every query")
        body["match"] = "all" if args.match_all else match
        out = client.call("POST", "/api/rules", body)
        _warn(out)
        return _print(args, out, f"rule {out['name']} added until {out['expires_at']}")
    if command == "rule" and action == "rm":
        out = client.call("DELETE", f"/api/rules/{_q(args.name)}")
        return _print(args, out, f"rule {args.name} removed")
    if command == "rule" and action == "list":
        out = client.call("GET", "/api/rules")
        return _print(args, out, table(out["rules"], ["name", "match", "fault", "expires_at",
                                                      "matched", "injected"])
                      if out["rules"] else "no ad hoc rule")
    if command == "deps":
        return _deps(args, client)
    if command == "preview":
        return _preview(args, client)
    if command == "recovery":
        out = client.call("GET", f"/api/reports/{_q(args.run)}")
        section = out.get("recovery")
        if not section:
            return _print(args, section, f"run {out['run']}: no recovery to watch "
                          "(still live, a dry run, or no client got a fault)")
        state = "closed" if section["closed"] else "open"
        text = (f"run {out['run']}: recovery window {section['window']:.0f} s, {state}\n\n"
                + table(section["entries"], ["client", "name", "status", "after"]))
        return _print(args, section, text)
    if command == "reset":
        out = client.call("POST", "/api/reset", {})
        return _print(args, out, f"reset: {len(out['runs'])} run(s) stopped, "
                                 f"{len(out['rules'])} rule(s) removed")
    if command == "report":
        if not args.run:
            out = client.call("GET", "/api/reports")
            return _print(args, out, table(out["reports"], ["run", "scenario", "ended",
                                                            "ended_at", "clients"]))
        if args.markdown and not args.json:
            print(client.call("GET", f"/api/reports/{_q(args.run)}", query={"format": "md"},
                              raw=True), end="")
            return 0
        out = client.call("GET", f"/api/reports/{_q(args.run)}")
        return _print(args, out, to_markdown(out).rstrip("\n"))
    raise DnschaosError(f"unknown command {command} {action or ''}")


def _deps(args: argparse.Namespace, client: Client) -> int:
    query = {k: v for k, v in (("client", args.client), ("suffix", args.suffix),
                                ("since", args.since)) if v}
    out = client.call("GET", "/api/dependencies", query=query)
    pairs = [(c["client"], n["name"], n["queries"]) for c in out["clients"] for n in c["names"]]
    if args.csv and not args.json:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(["client", "name", "queries", "qtypes", *ANSWERS])
        for c in out["clients"]:
            for n in c["names"]:
                writer.writerow([c["client"], n["name"], n["queries"],
                                 " ".join(f"{k}:{v}" for k, v in sorted(n["qtypes"].items())),
                                 *(n["answers"].get(k, 0) for k in ANSWERS)])
        return 0
    if args.dot and not args.json:
        print("digraph dependencies {\n  rankdir=LR;")
        for who, name, queries in pairs:
            print(f"  {json.dumps(who)} -> {json.dumps(name)} [label={queries}];")
        print("}")
        return 0
    if args.by == "name":
        names: dict[str, list[str]] = {}
        counts: dict[str, int] = {}
        for who, name, queries in pairs:
            names.setdefault(name, []).append(f"{who} ({queries})")
            counts[name] = counts.get(name, 0) + queries
        rows = [{"name": n, "queries": counts[n], "clients": ", ".join(c)}
                for n, c in sorted(names.items(), key=lambda kv: (-counts[kv[0]], kv[0]))]
        text = table(rows, ["name", "queries", "clients"]) if rows else "no query seen"
        return _print(args, out, text)
    rows = [{"client": c["client"], "name": n["name"], "queries": n["queries"],
             "qtypes": " ".join(f"{k}:{v}" for k, v in sorted(n["qtypes"].items())),
             "answers": " ".join(f"{k}:{v}" for k, v in n["answers"].items() if v),
             "last_seen": format_time(n["last_seen"])}
            for c in out["clients"] for n in c["names"]]
    text = (table(rows, ["client", "name", "queries", "qtypes", "answers", "last_seen"])
            if rows else "no query seen")
    if out.get("clients_overflow"):
        text += f"\n\n{out['clients_overflow']} queries from clients beyond the map's cap"
    return _print(args, out, text)


ANSWERS = ("data", "nodata", "nxdomain", "servfail", "refused", "timeout", "other")


def _preview(args: argparse.Namespace, client: Client) -> int:
    path = Path(args.scenario)
    scenario: Any = args.scenario
    if path.is_file():
        scenario = _mapping(path.read_text())
        if not isinstance(scenario, dict):
            raise DnschaosError(f"{path}: not a scenario mapping")
    out = client.call("POST", "/api/preview", {"scenario": scenario, "window": args.window})
    rows = []
    for phase in out["phases"]:
        for rule in phase["rules"]:
            if not rule["clients"]:
                rows.append({"phase": phase["name"], "rule": rule["name"],
                             "fault": rule["fault"], "client": "-", "names": "-",
                             "queries": 0, "expected_faults": 0})
            for c in rule["clients"]:
                rows.append({"phase": phase["name"], "rule": rule["name"],
                             "fault": rule["fault"], "client": c["client"],
                             "names": ", ".join(n["name"] for n in c["names"]),
                             "queries": c["queries"],
                             "expected_faults": f"{c['expected_faults']:.1f}"})
    text = table(rows, ["phase", "rule", "fault", "client", "names", "queries",
                        "expected_faults"])
    if not args.json:
        _preflight(out["preflight"])
    return _print(args, out, text)


def _preflight(checked: dict[str, Any] | None) -> None:
    """Preflight warnings to stderr."""
    for warning in (checked or {}).get("warnings") or []:
        print(f"preflight: {warning['kind']}: {warning['message']}", file=sys.stderr)


def _warn(out: dict[str, Any]) -> None:
    """The API's warnings (a run or rule cut by max_run_duration) to stderr."""
    for warning in out.get("warnings") or []:
        print(f"warning: {warning}", file=sys.stderr)


def _q(text: str) -> str:
    return urllib.parse.quote(text, safe="")


def _mapping(text: str) -> Any:
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise DnschaosError(f"not JSON or YAML: {text!r}: {exc}") from None
    return value


def _print(args: argparse.Namespace, data: Any, text: str) -> int:
    if args.json:
        json.dump(data, sys.stdout, indent=2)
        print()
    else:
        print(text)
    return 0
