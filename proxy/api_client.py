"""The `dnschaos` client subcommands: they call the admin API over HTTP and
print readable tables (or the API's JSON with --json)."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import yaml

from proxy.config import DEFAULT_ADMIN
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
        out = client.call("POST", f"/api/scenarios/{_q(args.name)}/start", body)
        _warn(out)
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
