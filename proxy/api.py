"""The admin HTTP JSON API: scenarios, runs, ad hoc rules, reports.

Served by the admin listener's aiohttp app in the proxy's own event loop
(see docs/openapi.yaml for every route).  Mutations (POST, DELETE) need
`Authorization: Bearer TOKEN` when a token is configured, and each one,
allowed or not, is written to the audit log; reads need it too when the
admin listener is off loopback (see auth_middleware).
"""

from __future__ import annotations

import hmac
import json
import math
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from proxy.affected import ClientGroups
from proxy.console import is_console_path
from proxy.core.model import Rule, Scenario
from proxy.core.schedule import format_time, next_start, parse_time
from proxy.core.spec import parse_duration
from proxy.dependencies import client_view, name_view
from proxy.errors import ControlUnavailable, DnschaosError, InvalidFile
from proxy.gameday import views
from proxy.gameday.audit import AuditLog
from proxy.gameday.records import Conflict, NotFound, Refused
from proxy.gameday.report import to_markdown
from proxy.gameday.runs import GameDay
from proxy.loader import load_model

GAMEDAY = web.AppKey("gameday", GameDay)
AUDIT = web.AppKey("audit", AuditLog)
GROUPS = web.AppKey("groups", ClientGroups)
DEFAULT_WINDOW = 3600.0
"""Seconds of the dependency map that preview and preflight look at by default."""
CONTROL = web.AppKey("control", object)
"""The control plane (proxy/control/plane.py), when there is one."""
NOT_APPLIED = "X-Dnschaos-Not-Applied"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MUTATING = ("POST", "PUT", "PATCH", "DELETE")


def add_routes(app: web.Application, gameday: GameDay, audit: AuditLog,
               groups: ClientGroups | None = None, control: Any = None) -> None:
    app[GAMEDAY] = gameday
    app[AUDIT] = audit
    app[GROUPS] = groups or ClientGroups()
    if control is not None:
        app[CONTROL] = control
    r = app.router
    r.add_get("/api/dependencies", dependencies)
    r.add_post("/api/preview", preview)
    r.add_get("/api/status", status)
    r.add_get("/api/scenarios", list_scenarios)
    r.add_get("/api/scenarios/{name}", show_scenario)
    r.add_post("/api/scenarios/{name}/start", audited("start")(start_scenario))
    r.add_post("/api/reload", audited("reload")(reload))
    r.add_get("/api/runs", list_runs)
    r.add_get("/api/runs/{run}", show_run)
    r.add_post("/api/runs/{run}/stop", audited("stop")(stop_run))
    r.add_post("/api/runs/{run}/pause", audited("pause")(pause_run))
    r.add_post("/api/runs/{run}/resume", audited("resume")(resume_run))
    r.add_post("/api/reset", audited("reset")(reset))
    r.add_get("/api/rules", list_rules)
    r.add_post("/api/rules", audited("rule_add")(add_rule))
    r.add_delete("/api/rules/{name}", audited("rule_remove")(remove_rule))
    r.add_get("/api/reports", list_reports)
    r.add_get("/api/reports/{run}", show_report)


# --- auth and audit -------------------------------------------------------------------


def who(request: web.Request) -> str:
    user = request.headers.get("X-Dnschaos-User", "").strip()[:64] or "anonymous"
    return f"{user} (token)" if request.get("authenticated") else user


def auth_middleware(audit: AuditLog | None, token: str | None, *, reads_need_token: bool,
                    metrics_need_token: bool = False) -> Any:
    """Which requests need `Authorization: Bearer TOKEN`: with a token,
    mutations of the API always; with `reads_need_token` (admin listener off
    loopback) every path but /health, /metrics and the console's files; /metrics with
    `metrics_need_token`.  Refused mutations are audited (refused reads are
    not, so that a scraper without the token cannot fill the audit log)."""

    def needs_token(request: web.Request) -> bool:
        if token is None:
            return False
        if request.path == "/metrics":
            return metrics_need_token
        if request.path in ("/health", "/ready") or is_console_path(request.path):
            return False  # the console's static files hold no data
        return reads_need_token or (request.method in MUTATING
                                    and request.path.startswith("/api/"))

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if needs_token(request):
            assert token is not None
            given = request.headers.get("Authorization", "")
            scheme, _, value = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                    value.strip().encode(), token.encode()):
                if audit is not None and request.method in MUTATING:
                    audit.write(who=who(request), source=request.remote or "?",
                                action=f"{request.method} {request.path}", result="denied: "
                                + ("no token" if not given else "wrong token"))
                return web.json_response(
                    {"error": "this needs Authorization: Bearer TOKEN "
                              "(the admin_token of the proxy)"},
                    status=401, headers={"WWW-Authenticate": 'Bearer realm="dnschaos"'})
            request["authenticated"] = True
        return await handler(request)

    return auth


def audited(action: str) -> Callable[[Handler], Handler]:
    """Write the mutation to the audit log, with its outcome."""

    def wrap(handler: Handler) -> Handler:
        async def run(request: web.Request) -> web.StreamResponse:
            body: Any = None
            try:
                body = await request.json() if request.can_read_body else None
            except ValueError:
                body = "<not JSON>"
            request["body"] = body
            target = request.match_info.get("name") or request.match_info.get("run")
            if target is None and isinstance(body, dict) and isinstance(body.get("name"), str):
                target = body["name"]  # POST /api/rules names its rule in the body
            try:
                response = await handler(request)
            except web.HTTPException as exc:
                _audit(request, action, target, body, f"error {exc.status}: {exc.text}")
                raise
            result = "ok" if response.status < 400 else f"error {response.status}"
            if response.status >= 400 and isinstance(response, web.Response) and response.text:
                result += ": " + json.loads(response.text).get("error", "")
            _audit(request, action, target, body, result,
                   getattr(response, "_audit_details", None))
            return response

        run.__name__ = handler.__name__
        run.__doc__ = handler.__doc__
        return run

    return wrap


def _audit(request: web.Request, action: str, target: str | None, body: Any, result: str,
           extra: dict[str, Any] | None = None) -> None:
    details = {"request": body} if body not in (None, {}) else {}
    if extra:
        details.update(extra)
    request.app[AUDIT].write(who=who(request), source=request.remote or "?", action=action,
                               target=target, details=details, result=result)


def _ok(data: Any, status: int = 200, audit: dict[str, Any] | None = None) -> web.Response:
    response = web.json_response(data, status=status, dumps=_dumps)
    if audit is not None:
        response._audit_details = audit  # type: ignore[attr-defined]
    return response


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _dumps(data: Any) -> str:
    return json.dumps(data, default=_default)


def _default(value: Any) -> Any:
    if isinstance(value, float) and math.isinf(value):
        return None
    return str(value)


def _gd(request: web.Request) -> GameDay:
    return request.app[GAMEDAY]


async def _mutate(request: web.Request, op: str, args: dict[str, Any],
                  here: Callable[[], Any]) -> tuple[Any, list[str] | None]:
    """Without a control plane: `here()`, at once.  With one: the operation
    appended to its log and applied by every instance; (its result here, the
    instances that had not applied it in time)."""
    control: Any = request.app.get(CONTROL)
    if control is None:
        return here(), None
    result, behind = await control.submit(op, args)
    return result, behind


def _fleet(data: dict[str, Any], behind: list[str] | None, status: int = 200,
           audit: dict[str, Any] | None = None) -> web.Response:
    """The answer of a mutation; with a control plane it says which live
    instances had not applied it (none: every one had)."""
    if behind is None:
        return _ok(data, status=status, audit=audit)
    response = _ok({**data, "not_applied": behind}, status=status, audit=audit)
    if behind:
        response.headers[NOT_APPLIED] = ", ".join(behind)
    return response


def _body(request: web.Request) -> dict[str, Any]:
    body = request.get("body")
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text=json.dumps({"error": "the body must be a JSON object"}),
                                 content_type="application/json")
    return body


def _errors(fn: Handler) -> Handler:
    async def run(request: web.Request) -> web.StreamResponse:
        try:
            return await fn(request)
        except NotFound as exc:
            return _error(404, str(exc))
        except ControlUnavailable as exc:
            return _error(503, str(exc))
        except Refused as exc:
            return web.json_response({"error": str(exc), "file": exc.file, "problems": [
                {"file": p.file, "line": p.line, "field": p.path, "message": p.message}
                for p in exc.problems]}, status=409)
        except Conflict as exc:
            return _error(409, str(exc))
        except InvalidFile as exc:
            return _error(400, str(exc))
        except (ValueError, TypeError, DnschaosError) as exc:
            return _error(400, str(exc))

    run.__name__ = fn.__name__
    return run


# --- scenarios --------------------------------------------------------------------------


@_errors
async def status(request: web.Request) -> web.Response:
    return _ok(views.status(_gd(request)))


def _scenario_row(gd: GameDay, name: str) -> dict[str, Any]:
    entry = gd.catalog.scenarios[name]
    s = entry.scenario
    now = gd.clock()
    return {
        "name": s.name, "description": s.description, "file": entry.file,
        "phases": len(s.phases), "duration": s.total_duration, "time_scale": s.time_scale,
        "schedule": s.schedule, "timezone": s.timezone,
        "next_start": format_time(next_start(s.schedule, s.timezone, now))
        if s.schedule and s.timezone else None,
        "max_duration": gd.run_length(s), "warnings": gd.length_warnings(s),
        "refused_file": gd.catalog.stale(name), "probes": [p.name for p in s.probes],
        "running": [r.id for r in gd.runs.values() if r.scenario.name == s.name],
    }


@_errors
async def list_scenarios(request: web.Request) -> web.Response:
    gd = _gd(request)
    return _ok({"scenarios": [_scenario_row(gd, n) for n in sorted(gd.catalog.scenarios)],
                "errors": dict(gd.catalog.errors)})


@_errors
async def show_scenario(request: web.Request) -> web.Response:
    gd = _gd(request)
    name = request.match_info["name"]
    if name not in gd.catalog.scenarios:
        raise NotFound(f"no scenario called {name!r}")
    s = gd.catalog.scenarios[name].scenario
    row = _scenario_row(gd, name)
    offset = 0.0
    phases = []
    for phase in s.phases:
        length = phase.duration * s.time_scale
        phases.append({
            "name": phase.name, "starts_after": offset, "duration": length,
            "rules": [{"name": rule.name or f"{phase.name}/{i}",
                       "match": rule.match.model_dump(by_alias=True, exclude_none=True),
                       "fault": rule.fault.model_dump(by_alias=True, exclude_none=True)}
                      for i, rule in enumerate(phase.rules)],
        })
        offset += length
    row["phases"] = phases
    row["probe_specs"] = [p.model_dump(exclude_none=True) for p in s.probes]
    return _ok(row)


def _time(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        return parse_time(value)
    raise ValueError(f"invalid time {value!r}: write e.g. 2026-12-01T14:00Z")


def _duration(value: Any) -> float | None:
    return None if value is None else parse_duration(value)


@_errors
async def start_scenario(request: web.Request) -> web.Response:
    body = _body(request)
    unknown = set(body) - {"at", "dry_run", "time_scale", "max_duration", "require_traffic"}
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)}: expected at, dry_run, time_scale, "
                         "max_duration, require_traffic")
    time_scale = body.get("time_scale")
    if time_scale is not None and not isinstance(time_scale, (int, float)):
        raise ValueError("time_scale must be a number")
    gd = _gd(request)
    name = request.match_info["name"]
    checked = gd.preview(name, DEFAULT_WINDOW)["preflight"]  # NotFound for an unknown name
    if body.get("require_traffic") and checked["selects_nothing"]:
        return _ok({"error": "require_traffic: rules that would select no query: "
                    + ", ".join(checked["selects_nothing"]), "preflight": checked}, status=409)
    args: dict[str, Any] = {"scenario": name, "at": _time(body.get("at")),
            "dry_run": bool(body.get("dry_run", False)), "time_scale": time_scale,
            "max_duration": _duration(body.get("max_duration")), "trigger": "api",
            "who": who(request)}
    run_id, behind = await _mutate(request, "start", args,
                                   lambda: _gd(request).start(**args).id)
    row = views.run_row(_gd(request), run_id)
    row["preflight"] = checked
    return _fleet(row, behind, status=201, audit={"run": run_id})


@_errors
async def reload(request: web.Request) -> web.Response:
    changes = _gd(request).reload()
    return _ok({"changed": changes.changed, "removed": changes.removed,
                "errors": changes.errors})


# --- dependency map and preview --------------------------------------------------------------


@_errors
async def dependencies(request: web.Request) -> web.Response:
    """?client= (address or group) &suffix= (zone) &since= (time, or a duration ago) &by=name"""
    gd = _gd(request)
    query = request.query
    unknown = set(query) - {"client", "suffix", "since", "by"}
    if unknown:
        raise ValueError(f"unknown parameters {sorted(unknown)}: expected client, suffix, "
                         "since, by")
    now = gd.clock()
    since = None
    if query.get("since"):
        text = query["since"]
        if _number(text):
            since = float(text)  # a Unix time
        else:
            try:
                since = now - parse_duration(text)
            except ValueError:
                since = _time(text)  # ISO 8601
    by = query.get("by", "client")
    if by not in ("client", "name"):
        raise ValueError("by is client or name")
    control: Any = request.app.get(CONTROL)
    rows = await control.fleet_deps() if control is not None else gd.deps()
    view = client_view(rows, request.app[GROUPS], now, client=query.get("client") or None,
                       suffix=query.get("suffix") or None, since=since)
    return _ok(name_view(view) if by == "name" else view)


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@_errors
async def preview(request: web.Request) -> web.Response:
    body = await request.json() if request.can_read_body else {}
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object")
    unknown = set(body) - {"scenario", "window"}
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)}: expected scenario, window")
    given = body.get("scenario")
    ref: str | Scenario
    if isinstance(given, str):
        ref = given
    elif isinstance(given, dict):
        ref = load_model(json.dumps(given), "<api>", Scenario)
    else:
        raise ValueError('"scenario" is a scenario name or an inline scenario document')
    window = _duration(body.get("window")) or DEFAULT_WINDOW
    return _ok(_gd(request).preview(ref, window))


# --- runs -----------------------------------------------------------------------------------


@_errors
async def list_runs(request: web.Request) -> web.Response:
    return _ok({"runs": views.run_rows(_gd(request))})


@_errors
async def show_run(request: web.Request) -> web.Response:
    row = views.run_row(_gd(request), request.match_info["run"])
    control: Any = request.app.get(CONTROL)
    if control is not None and "rules" in row:  # a live run: every instance's counts
        row["rules"], row["instances"] = await control.fleet_stats(row["run"])
    return _ok(row)


@_errors
async def stop_run(request: web.Request) -> web.Response:
    body = _body(request)
    detail = f"stopped by {who(request)}" + (f": {body['reason']}" if body.get("reason") else "")
    ref = request.match_info["run"]
    stopped, behind = await _mutate(
        request, "stop", {"ref": ref, "reason": "stopped", "detail": detail},
        lambda: _gd(request).stop(ref, reason="stopped", detail=detail))
    return _fleet({"stopped": stopped}, behind)


@_errors
async def pause_run(request: web.Request) -> web.Response:
    ref = request.match_info["run"]
    paused, behind = await _mutate(request, "pause", {"ref": ref},
                                   lambda: _gd(request).pause(ref))
    return _fleet({"paused": paused}, behind)


@_errors
async def resume_run(request: web.Request) -> web.Response:
    ref = request.match_info["run"]
    resumed, behind = await _mutate(request, "resume", {"ref": ref},
                                    lambda: _gd(request).resume(ref))
    return _fleet({"resumed": resumed}, behind)


@_errors
async def reset(request: web.Request) -> web.Response:
    detail = f"reset by {who(request)}"
    done, behind = await _mutate(request, "reset", {"detail": detail},
                                 lambda: _gd(request).reset(detail=detail))
    return _fleet(done, behind)


# --- ad hoc rules ---------------------------------------------------------------------------


@_errors
async def list_rules(request: web.Request) -> web.Response:
    return _ok({"rules": views.rule_rows(_gd(request))})


@_errors
async def add_rule(request: web.Request) -> web.Response:
    body = dict(_body(request))
    name = body.pop("name", None)
    if not isinstance(name, str) or not name:
        raise ValueError("a rule needs a name")
    duration = _duration(body.pop("duration", None))
    dry_run = bool(body.pop("dry_run", False))
    match = body.get("match")
    if match is None or match == {}:
        # A forgotten selector would fault every name: that must be asked for.
        raise ValueError('a rule needs a selector: "match": {"name": ...}, {"suffix": ...}, '
                         '{"clients": ...}... or "match": "all" to fault every query')
    rule = load_model(json.dumps({"name": name, **body}), "<api>", Rule)
    added, behind = await _mutate(
        request, "rule_add", {"name": name, "rule": rule, "duration": duration,
                              "dry_run": dry_run, "who": who(request)},
        lambda: _gd(request).add_rule(name, rule, duration=duration, dry_run=dry_run,
                                      who=who(request)).name)
    row = next(r for r in views.rule_rows(_gd(request)) if r["name"] == added)
    return _fleet(row, behind, status=201)


@_errors
async def remove_rule(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    _, behind = await _mutate(request, "rule_remove", {"name": name},
                              lambda: _gd(request).remove_rule(name))
    return _fleet({"removed": name}, behind)


# --- reports -----------------------------------------------------------------------------------


@_errors
async def list_reports(request: web.Request) -> web.Response:
    reports = _gd(request).reports
    return _ok({"reports": [
        {"run": r["run"], "scenario": r["scenario"], "dry_run": r["dry_run"],
         "started_at": r["started_at"], "ended_at": r["ended_at"], "ended": r["ended"],
         "ended_because": r["ended_because"], "clients": r["totals"]["clients"]}
        for r in reversed(list(reports.values()))]})


@_errors
async def show_report(request: web.Request) -> web.Response:
    gd = _gd(request)
    report = gd.report(request.match_info["run"])
    control: Any = request.app.get(CONTROL)
    if control is not None:  # every instance's counts
        report = await control.merged_report(gd.latest_run(request.match_info["run"])) or report
    fmt = request.query.get("format", "json")
    if fmt == "md":
        return web.Response(text=to_markdown(report), content_type="text/markdown")
    if fmt != "json":
        raise ValueError("format is json or md")
    return _ok(report)
